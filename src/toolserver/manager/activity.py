"""Last-request times kept in memory and written to the records at most once per interval."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime

from toolserver.errors import DatabaseUnavailable
from toolserver.manager.models import utcnow
from toolserver.manager.store import Store

log = logging.getLogger(__name__)


class ActivityBuffer:
    """``touch()`` costs a dict write; ``flush()`` writes everything pending in one transaction."""

    def __init__(self, store: Store, interval: float = 1.0) -> None:
        self.store = store
        self.interval = interval
        self._pending: dict[str, datetime] = {}
        self._task: asyncio.Task[None] | None = None

    def touch(self, node_id: str) -> None:
        self._pending[node_id] = utcnow()

    def forget(self, node_id: str) -> None:
        self._pending.pop(node_id, None)

    def pending(self, node_id: str) -> datetime | None:
        return self._pending.get(node_id)

    async def flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        try:
            await self.store.touch_nodes(batch)
        except DatabaseUnavailable as exc:
            log.warning("could not write last request times (%s); will retry", exc)
            self._keep(batch)
        except Exception:
            log.exception("could not write last request times; will retry")
            self._keep(batch)

    def _keep(self, batch: dict[str, datetime]) -> None:
        """Put an unwritten batch back, under any newer times touched meanwhile."""
        for node_id, when in batch.items():
            self._pending.setdefault(node_id, when)

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
