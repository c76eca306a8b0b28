"""Session events: one log line each, and a row in ``session_events`` for the admin API.

Events: ``created`` (a cold start; its row is written with the record, see
:meth:`Store.admit_node`), ``claimed`` (a warm-pool node), ``failed`` (a start that did not come
up), ``reconnected``, ``closed``, ``released`` and ``died`` (the node stopped or vanished
without being asked); ``paused``, ``woken``, ``forked``, ``extended`` and ``expired`` (the
lifetime's, see :mod:`toolserver.manager.wake`). Each also goes to the webhooks
(:mod:`toolserver.manager.webhooks`) when there are any.

A line names the session by its short id and its owner by key name, never a cookie, key or
secret::

    session 3f9a1c2b7d4e created owner=alice labels={'run': 'nightly'} (cold start, 1.21 s)

With ``log_format: json`` the same facts are fields: ``event``, ``session``, ``owner``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from toolserver.errors import DatabaseUnavailable
from toolserver.manager.models import SessionEvent, ToolServerNode, utcnow
from toolserver.manager.store import Store

if TYPE_CHECKING:
    from toolserver.manager.checker import TickReport
    from toolserver.manager.metrics import Metrics

log = logging.getLogger("toolserver.sessions")

#: Events older than this are pruned.
RETENTION = timedelta(days=7)
#: Prune once every this many recorded events.
PRUNE_EVERY = 500


class SessionEvents:
    """Writes and logs session events; ``owner_name`` turns a key id into the name logs show."""

    def __init__(self, store: Store, owner_name: Callable[[str | None], str]) -> None:
        self.store = store
        self.owner_name = owner_name
        self._since_prune = 0
        #: called with every event as it is logged (the webhooks' queue, which never waits)
        self.sink: Callable[[ToolServerNode, str, str | None], None] | None = None

    def log(
        self, node: ToolServerNode, kind: str, detail: str | None = None, level: int = logging.INFO
    ) -> None:
        if self.sink is not None:
            self.sink(node, kind, detail)
        owner = self.owner_name(node.owner)
        labels = f" labels={node.labels}" if node.labels and kind in ("created", "claimed") else ""
        suffix = f" ({detail})" if detail else ""
        log.log(
            level,
            "session %s %s owner=%s%s%s",
            node.short_id,
            kind,
            owner,
            labels,
            suffix,
            extra={"event": kind, "session": node.short_id, "owner": owner, "owner_id": node.owner},
        )

    async def record(
        self,
        node: ToolServerNode,
        kind: str,
        detail: str | None = None,
        *,
        write: bool = True,
        level: int = logging.INFO,
    ) -> None:
        """Log the event and, with ``write``, store it (a failed write is logged, never raised)."""
        self.log(node, kind, detail, level)
        if write:
            await self.write([(node, kind, detail)])

    async def write(self, events: list[tuple[ToolServerNode, str, str | None]]) -> None:
        rows = [
            SessionEvent(short_id=n.short_id, owner=n.owner, kind=k, detail=d, at=utcnow())
            for n, k, d in events
        ]
        try:
            await self.store.add_events(rows)
            self._since_prune += len(rows)
            if self._since_prune >= PRUNE_EVERY:
                self._since_prune = 0
                await self.store.prune_events(utcnow() - RETENTION)
        except DatabaseUnavailable as exc:
            log.warning("could not store %d session event(s): %s", len(rows), exc)
        except Exception:
            log.exception("could not store %d session event(s)", len(rows))


def event_json(event: SessionEvent) -> dict[str, Any]:
    return {"at": event.at.isoformat() + "Z", "kind": event.kind, "detail": event.detail}


def tick_observer(
    events: SessionEvents, metrics: Metrics | None = None
) -> Callable[[TickReport], Awaitable[None]]:
    """What the checker loop calls after each tick: record its session events, update metrics."""

    async def observe(report: TickReport) -> None:
        if metrics is not None:
            metrics.checker_tick_seconds.observe(report.seconds)
            if report.errors:
                metrics.checker_errors.inc(report.errors)
        for node, kind, detail in report.events:
            events.log(node, kind, detail, logging.WARNING if kind == "died" else logging.INFO)
        await events.write(report.events)

    return observe
