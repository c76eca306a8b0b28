"""The warm pool: ``node.warm_pool_size`` started, healthy nodes that no session holds yet.

``/get_cookie`` claims one (see :meth:`Store.claim_pooled`); the pool refills in the background,
:data:`REFILL_DELAY_SECONDS` after the claim.
A pool node has never served anyone, so it is as fresh as a cold one: empty workspace, its own
secret, no kernel started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from toolserver.errors import CapacityExceeded
from toolserver.manager.models import Ownership
from toolserver.manager.sessions import SessionService

log = logging.getLogger(__name__)

#: Pool nodes started at once while refilling (the machine also serves sessions meanwhile).
REFILL_CONCURRENCY = 2
MAX_BACKOFF = 30.0
#: After a claim, the refill waits this long: a node's start takes a core for a good part of a
#: second, and the session that just claimed a node makes its first calls right now.
REFILL_DELAY_SECONDS = 0.5


class WarmPool:
    def __init__(self, sessions: SessionService, size: int, interval: float) -> None:
        self.sessions = sessions
        self.store = sessions.store
        self.size = size
        self.interval = interval
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.sessions.on_claim = self._wake.set
        self._task = asyncio.create_task(self._run(), name="warm-pool")

    async def fill_once(self) -> int:
        """Start pool nodes until the pool is full or a start fails; returns how many started."""
        started = 0
        while (missing := self.size - await self.store.count_pooled(self.sessions.manager_id)) > 0:
            batch = min(missing, REFILL_CONCURRENCY)
            results = await asyncio.gather(
                *(self.sessions.start_node(pooled=True) for _ in range(batch)), return_exceptions=True
            )
            errors = [r for r in results if isinstance(r, BaseException)]
            started += batch - len(errors)
            if errors:
                if not all(isinstance(e, CapacityExceeded) for e in errors):
                    raise errors[0]
                break
        return started

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                await self.fill_once()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                log.warning("warm pool: could not start a node (%s); retrying", exc)
            delay = min(MAX_BACKOFF, self.interval * (2**failures)) if failures else self.interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            if self._wake.is_set():  # a claim: let the session's first calls go first
                await asyncio.sleep(REFILL_DELAY_SECONDS)
            self._wake.clear()

    async def aclose(self, release: bool) -> None:
        """Stop refilling; with ``release`` remove the pool's nodes (they never served anyone)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if release:
            nodes = await self.store.list_nodes(self.sessions.manager_id)
            ready = [n for n in nodes if n.ownership == Ownership.POOL]  # not another process's starts
            await asyncio.gather(*(self.sessions.release_node(n) for n in ready), return_exceptions=True)
