"""Session events to the operator's webhooks (``events.webhooks``).

Every session event (created, claimed, paused, woken, forked, extended, expired, closed,
released, died, failed, reconnected) is POSTed to each URL as one JSON object::

    {"id": "3f9a…-17", "seq": 17, "manager_id": "m1", "session": "3f9a1c2b7d4e", "kind": "died",
     "detail": "exit code 137", "owner": "alice", "labels": {"run": "nightly"},
     "at": "2026-12-02T01:02:03.456Z"}

signed in ``X-ToolServer-Signature: sha256=<hex HMAC-SHA256 of the body with events.secret>``
(``X-ToolServer-Event`` names the kind). Each URL has its own queue and one sender that delivers
its events one at a time, in the order they happened, so a session's events arrive in order;
a failed delivery (no answer, or a status other than 2xx) is retried with exponential backoff
(up to ``events.retry_max_seconds`` between attempts, ``events.max_attempts`` in all) before the
event is dropped and logged. Queueing costs the session nothing: :meth:`Webhooks.emit` never
waits, and when a queue is full (a receiver down for long) new events for it are dropped, logged
and counted (``toolserver_webhook_failures_total``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
from datetime import datetime
from typing import Any

import aiohttp

from toolserver.manager.metrics import Metrics
from toolserver.manager.models import ToolServerNode, utcnow
from toolserver.manager.settings import EventSettings

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-ToolServer-Signature"
EVENT_HEADER = "X-ToolServer-Event"
#: First pause after a failed delivery; doubled after each further failure.
FIRST_RETRY = 0.2
#: Longest a shutdown waits for queued events to go out.
SHUTDOWN_GRACE = 2.0


def signature(secret: str, body: bytes) -> str:
    """The signature header's value for ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str | None) -> bool:
    """Whether ``header`` is the signature of ``body`` (what a receiver checks; constant time)."""
    return header is not None and hmac.compare_digest(signature(secret, body), header)


class Webhooks:
    """One queue and one sender per URL; :meth:`emit` is the whole cost for the caller."""

    def __init__(
        self, settings: EventSettings, manager_id: str, owner_name: Any, metrics: Metrics | None = None
    ) -> None:
        self.settings = settings
        self.manager_id = manager_id
        self.owner_name = owner_name
        self.metrics = metrics
        self._seq = 0
        self._run = secrets.token_hex(4)  # ids stay unique across restarts of the manager
        self._queues = {url: asyncio.Queue[bytes](settings.queue_size) for url in settings.webhooks}
        self._tasks: list[asyncio.Task[None]] = []
        self._http: aiohttp.ClientSession | None = None
        self.dropped = 0

    def start(self) -> None:
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.settings.timeout_seconds),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self._tasks = [
            asyncio.create_task(self._deliver(url, queue), name=f"webhook {url}")
            for url, queue in self._queues.items()
        ]

    def emit(self, node: ToolServerNode, kind: str, detail: str | None, at: datetime | None = None) -> None:
        """Queue the event for every URL (never waits)."""
        self._seq += 1
        event = {
            "id": f"{self._run}-{self._seq}",
            "seq": self._seq,
            "manager_id": self.manager_id,
            "session": node.short_id,
            "kind": kind,
            "detail": detail,
            "owner": self.owner_name(node.owner) if node.owner else None,
            "labels": dict(node.labels or {}),
            "at": (at or utcnow()).isoformat(timespec="milliseconds") + "Z",
        }
        body = json.dumps(event, separators=(",", ":")).encode()
        for url, queue in self._queues.items():
            try:
                queue.put_nowait(body)
            except asyncio.QueueFull:
                self._drop(url, f"its queue is full ({self.settings.queue_size} events, events.queue_size)")

    def _drop(self, url: str, why: str) -> None:
        self.dropped += 1
        if self.metrics is not None:
            self.metrics.webhook_failures.inc()
        log.warning("webhook %s: an event was dropped: %s", url, why)

    async def _deliver(self, url: str, queue: asyncio.Queue[bytes]) -> None:
        cfg = self.settings
        assert cfg.secret is not None and self._http is not None
        while True:
            body = await queue.get()
            kind = json.loads(body)["kind"]
            headers = {
                "Content-Type": "application/json",
                SIGNATURE_HEADER: signature(cfg.secret, body),
                EVENT_HEADER: kind,
            }
            delay = FIRST_RETRY
            for attempt in range(1, cfg.max_attempts + 1):
                try:
                    post = self._http.post(url, data=body, headers=headers, allow_redirects=False)
                    async with post as resp:
                        if 200 <= resp.status < 300:
                            break
                        why = f"HTTP {resp.status}"
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    why = str(exc) or type(exc).__name__
                if self.metrics is not None:
                    self.metrics.webhook_failures.inc()
                if attempt == cfg.max_attempts:
                    self._drop(url, f"{kind} not delivered after {attempt} attempts ({why})")
                    break
                log.info("webhook %s: attempt %d failed (%s); retrying in %.1f s", url, attempt, why, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, cfg.retry_max_seconds)
            queue.task_done()

    async def aclose(self) -> None:
        """Give queued events a moment to go out, then stop."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SHUTDOWN_GRACE):
                await asyncio.gather(*(q.join() for q in self._queues.values()))
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._http is not None:
            await self._http.close()
