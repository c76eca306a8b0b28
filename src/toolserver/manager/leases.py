"""Manager leases: a replica is alive while its lease in the shared database has not expired.

Each manager id holds one row of ``manager_leases`` (:class:`~toolserver.manager.models.ManagerLease`).
The process that runs the manager's checker renews it every checker interval: ``deadline`` moves
to the database's clock plus ``lease_seconds``. Times are the database's own (PostgreSQL's
``now()``), so the clocks of the replicas' hosts never enter the comparison; SQLite, a
single-host database, uses this host's clock.

A replica's liveness is never read from a pid: a process of another host cannot be asked, and
one that is stuck is as good as dead to its sessions. What happens past the deadline is
:mod:`toolserver.manager.adoption`'s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import DateTime, delete, func, literal, select, update
from sqlalchemy.exc import IntegrityError

from toolserver.manager.models import ManagerLease, ToolServerNode, utcnow
from toolserver.manager.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseView:
    """Another manager's lease as a replica sees it."""

    manager_id: str
    deadline: datetime
    adopted_by: str | None
    expired: bool


def database_now(store: Store, offset: timedelta = timedelta(0)) -> Any:
    """An SQL expression for "now" (plus ``offset``) in naive UTC on the database's clock.

    SQLite, a single-host database, has neither a clock of its own nor datetime arithmetic (it
    would add a number to the text it stores times as): there it is this host's time, computed
    here.
    """
    if store.url.get_backend_name() == "postgresql":
        now = func.timezone("UTC", func.now())
        return now + offset if offset else now
    return literal(utcnow() + offset, DateTime)


class Leases:
    """The lease of one manager id (``manager_id``), renewed by the process named ``holder``."""

    def __init__(self, store: Store, manager_id: str, holder: str, lease_seconds: float) -> None:
        self.store = store
        self.manager_id = manager_id
        self.holder = holder
        self.lease_seconds = lease_seconds

    async def renew(self) -> bool:
        """Move this manager's deadline ``lease_seconds`` ahead; True when the lease had been
        adopted meanwhile (its nodes are another replica's now, and stay so).

        Renewing also clears ``adopted_by``: the nodes this manager makes from now on are its own,
        and adoptable again should it die.
        """
        now = database_now(self.store)
        lease = timedelta(seconds=self.lease_seconds)
        deadline = database_now(self.store, lease)
        q = (
            update(ManagerLease)
            .where(ManagerLease.manager_id == self.manager_id)
            .values(heartbeat_at=now, deadline=deadline, holder=self.holder, adopted_by=None, adopted_at=None)
        )
        before = select(ManagerLease.adopted_by).where(ManagerLease.manager_id == self.manager_id)
        for _ in range(2):
            async with self.store._write() as s:
                adopted_by = (await s.execute(before.with_for_update())).scalar_one_or_none()
                if (await s.execute(q)).rowcount:
                    if adopted_by is not None:
                        log.warning(
                            "lease of manager %s had expired: replica %s adopted its nodes (they stay there)",
                            self.manager_id,
                            adopted_by,
                        )
                    return adopted_by is not None
            try:
                async with self.store._write() as s:
                    at = (await s.execute(select(now))).scalar_one()
                    s.add(
                        ManagerLease(
                            manager_id=self.manager_id,
                            holder=self.holder,
                            heartbeat_at=at,
                            deadline=at + lease,
                        )
                    )
                return False
            except IntegrityError:  # another process of this manager id inserted it first
                continue
        return False

    async def expire(self) -> None:
        """End this manager's lease now (a graceful shutdown): a live replica adopts its nodes at
        its next tick rather than one lease later."""
        q = (
            update(ManagerLease)
            .where(ManagerLease.manager_id == self.manager_id, ManagerLease.holder == self.holder)
            .values(deadline=database_now(self.store, -timedelta(seconds=1)))
        )
        async with self.store._write() as s:
            await s.execute(q)

    async def prune(self, older_than: timedelta) -> list[str]:
        """Delete the leases of managers adopted more than ``older_than`` ago that hold no record
        since (a replica that never came back: a pod's manager id is gone with its pod); their ids."""
        now = database_now(self.store)
        cutoff = database_now(self.store, -older_than)
        holds = (
            select(ToolServerNode.id)
            .where(ToolServerNode.manager_id == ManagerLease.manager_id)
            .correlate(ManagerLease)
        )
        q = (
            delete(ManagerLease)
            .where(
                ManagerLease.manager_id != self.manager_id,
                ManagerLease.adopted_by.is_not(None),
                ManagerLease.adopted_at < cutoff,
                ManagerLease.deadline < now,
                ~holds.exists(),
            )
            .returning(ManagerLease.manager_id)
        )
        async with self.store._write() as s:
            return list((await s.scalars(q)).all())

    async def others(self) -> list[LeaseView]:
        """Every other manager's lease, with whether it has expired (on the database's clock)."""
        now = database_now(self.store)
        q = select(
            ManagerLease.manager_id,
            ManagerLease.deadline,
            ManagerLease.adopted_by,
            ManagerLease.deadline < now,
        ).where(ManagerLease.manager_id != self.manager_id)
        async with self.store._read() as s:
            rows = (await s.execute(q)).all()
        return [LeaseView(m, d, a, bool(e)) for m, d, a, e in rows]


__all__ = ["LeaseView", "Leases", "database_now"]
