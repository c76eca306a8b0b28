"""Last-request times kept in memory and written to the records at most once per interval.

Nothing one node does can hold up another node's times: the write is an ``UPDATE … WHERE id``
per node (a record released meanwhile matches no row), a batch that fails for a reason other than
an outage is retried node by node (a node whose own write keeps failing is dropped), and times
only move forward. While the database is down the batch waits in memory, bounded by
:data:`MAX_PENDING` nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime

from toolserver.errors import DatabaseUnavailable
from toolserver.manager.models import utcnow
from toolserver.manager.store import Store

log = logging.getLogger(__name__)

#: Most nodes whose times wait unwritten; touches of further nodes are dropped until a flush
#: succeeds (each live node holds at most one entry, so only a long outage gets here).
MAX_PENDING = 65536


class ActivityBuffer:
    """``touch()`` costs a dict write; ``flush()`` writes everything pending in one transaction."""

    def __init__(self, store: Store, interval: float = 1.0, max_pending: int = MAX_PENDING) -> None:
        self.store = store
        self.interval = interval
        self.max_pending = max_pending
        self._pending: dict[str, datetime] = {}
        self._inflight: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self.dropped = 0

    def touch(self, node_id: str) -> None:
        pending = self._pending
        if node_id not in pending and len(pending) >= self.max_pending:
            self.dropped += 1
            return
        pending[node_id] = utcnow()

    def begin(self, node_id: str) -> None:
        """A request for ``node_id`` starts: touched, and counted in flight until :meth:`end`."""
        self.touch(node_id)
        self._inflight[node_id] = self._inflight.get(node_id, 0) + 1

    def end(self, node_id: str) -> None:
        """The request ends: touched again (its end is activity too)."""
        self.touch(node_id)
        left = self._inflight.get(node_id, 0) - 1
        if left > 0:
            self._inflight[node_id] = left
        else:
            self._inflight.pop(node_id, None)

    def in_flight(self, node_id: str) -> bool:
        """Whether this process is forwarding a request to ``node_id`` right now."""
        return node_id in self._inflight

    def forget(self, node_id: str) -> None:
        self._pending.pop(node_id, None)

    def pending(self, node_id: str) -> datetime | None:
        return self._pending.get(node_id)

    @property
    def waiting(self) -> int:
        """How many nodes' times wait to be written."""
        return len(self._pending)

    async def flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        try:
            await self.store.touch_nodes(batch)
        except DatabaseUnavailable as exc:
            self._keep(batch)
            self._failed(f"could not write last request times ({exc}); they wait in memory")
            return
        except Exception as exc:
            log.warning("writing %d last request times failed (%s); writing them one by one", len(batch), exc)
            await self._one_by_one(batch)
            return
        if self._failing:
            self._failing = False
            log.info("last request times written again")

    async def _one_by_one(self, batch: dict[str, datetime]) -> None:
        """Write each time on its own, so that one bad record cannot hold up the others."""
        for node_id, when in batch.items():
            try:
                await self.store.touch_nodes({node_id: when})
            except DatabaseUnavailable:
                self._keep({node_id: when})
            except Exception:
                log.exception("dropping the last request time of one node: its write fails")

    def _keep(self, batch: dict[str, datetime]) -> None:
        """Put an unwritten batch back, under any newer times touched meanwhile."""
        pending = self._pending
        for node_id, when in batch.items():
            if node_id in pending or len(pending) < self.max_pending:
                pending[node_id] = max(when, pending.get(node_id, when))

    def _failed(self, message: str) -> None:
        """Warn once per outage, not on every flush."""
        if not self._failing:
            self._failing = True
            log.warning(message)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.flush()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="activity-flush")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()
