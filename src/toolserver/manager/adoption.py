"""Adoption: a live replica takes over the nodes of a manager whose lease expired.

The checker of every replica renews its own lease (:mod:`toolserver.manager.leases`) and, before
each tick, looks for leases past their deadline that nobody adopted. For each one it runs one
transaction::

    UPDATE manager_leases SET adopted_by = me WHERE manager_id = dead AND adopted_by IS NULL
                                              AND deadline < now()
    UPDATE toolserver_nodes SET manager_id = me, origin = coalesce(origin, dead) WHERE manager_id = dead

The first statement is the claim: PostgreSQL locks the lease row, a second replica's update
waits for the first to commit and then finds ``adopted_by`` set and changes nothing (SQLite
serialises writers). So one replica adopts, never two, and the records move in the same
transaction as the claim. From its next tick on the adopter's checker keeps the records true; the
runtime still marks the nodes with the manager that made them (``origin``), so the adopter lists
those marks too.

A replica adopts only once it has renewed its own lease without a break for a whole lease: after
a database outage every replica's lease looks expired, and each must first show it is alive
before any takes another's nodes. A replica that comes back finds its nodes adopted and leaves
them there; a graceful shutdown ends the lease at once, so its nodes are adopted at the next tick
of a live replica rather than one lease later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import func, select, update

from toolserver.errors import DatabaseUnavailable
from toolserver.manager.leases import Leases, database_now
from toolserver.manager.models import ManagerLease, ToolServerNode
from toolserver.manager.settings import Settings
from toolserver.manager.store import Store

log = logging.getLogger(__name__)

#: seconds between two prunes of old leases by one replica
PRUNE_EVERY = 600.0


@dataclass(frozen=True)
class Adopted:
    """What one adoption moved: the dead manager, its nodes' short ids and the marks they carry."""

    manager_id: str
    short_ids: list[str] = field(default_factory=list)
    origins: set[str] = field(default_factory=set)


async def adopt(store: Store, dead: str, adopter: str) -> Adopted | None:
    """Move every record of manager ``dead`` to ``adopter`` if its lease expired and nobody adopted
    it yet, in one transaction; None when another replica won (or the lease is live again)."""
    now = database_now(store)
    claim = (
        update(ManagerLease)
        .where(
            ManagerLease.manager_id == dead,
            ManagerLease.adopted_by.is_(None),
            ManagerLease.deadline < now,
        )
        .values(adopted_by=adopter, adopted_at=now)
    )
    origin = func.coalesce(ToolServerNode.origin, ToolServerNode.manager_id)
    marks = select(origin).where(ToolServerNode.manager_id == dead).distinct()
    move = (
        update(ToolServerNode)
        .where(ToolServerNode.manager_id == dead)
        .values(manager_id=adopter, origin=origin)
        .returning(ToolServerNode.short_id)
    )
    async with store._write() as s:
        if not (await s.execute(claim)).rowcount:
            return None
        origins = set((await s.scalars(marks)).all())
        short_ids = list((await s.scalars(move)).all())
    return Adopted(dead, short_ids, origins)


class Adopter:
    """One replica's side of it: renew the lease, and adopt the nodes of expired ones."""

    def __init__(
        self, store: Store, leases: Leases, *, enabled: bool = True, retention: timedelta = timedelta(days=1)
    ) -> None:
        self.store = store
        self.leases = leases
        self.manager_id = leases.manager_id
        self.enabled = enabled
        #: how long the lease of an adopted replica is kept (see Leases.prune)
        self.retention = retention
        self._pruned_at: float | None = None
        #: monotonic time since which every renewal succeeded (None: the last one failed)
        self._live_since: float | None = None
        self._said_waiting = False

    async def renew(self) -> None:
        """Renew the lease once; DatabaseUnavailable when the database cannot be reached."""
        try:
            await self.leases.renew()
        except DatabaseUnavailable:
            self._live_since = None
            raise
        if self._live_since is None:
            self._live_since = time.monotonic()

    async def keep_alive(self, interval: float) -> None:
        """Renew every ``interval`` seconds until cancelled (its own task, so that a long tick
        never lets the lease lapse)."""
        failing = False
        while True:
            try:
                await self.renew()
                if failing:
                    log.info("lease of manager %s renewed again", self.manager_id)
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:
                    log.warning("lease of manager %s not renewed: %s", self.manager_id, exc)
                failing = True
                self._live_since = None
            await asyncio.sleep(interval)

    @property
    def trusted(self) -> bool:
        """Whether this replica has been renewing for a whole lease without a break."""
        since = self._live_since
        return since is not None and time.monotonic() - since >= self.leases.lease_seconds

    async def adopt_expired(self) -> list[Adopted]:
        """Adopt the nodes of every manager whose lease expired unadopted (see the module doc)."""
        if not self.enabled or not self.trusted:
            return []
        done = []
        for lease in await self.leases.others():
            if not lease.expired or lease.adopted_by is not None:
                continue
            adopted = await adopt(self.store, lease.manager_id, self.manager_id)
            if adopted is None:
                continue
            log.warning(
                "adopted %d nodes of manager %s, whose lease expired at %sZ",
                len(adopted.short_ids),
                lease.manager_id,
                lease.deadline.isoformat(timespec="seconds"),
            )
            done.append(adopted)
        return done

    async def prune(self) -> list[str]:
        """Delete the leases of adopted replicas that never came back, at most every PRUNE_EVERY
        seconds (a write to the shared database, so not every tick); the ids deleted."""
        if self._pruned_at is not None and time.monotonic() - self._pruned_at < PRUNE_EVERY:
            return []
        self._pruned_at = time.monotonic()
        gone = await self.leases.prune(self.retention)
        for manager_id in gone:
            log.info("deleted the lease of manager %s, adopted over %s ago", manager_id, self.retention)
        return gone

    async def step_down(self) -> None:
        """End the lease at shutdown (best effort): the nodes go to a live replica at once."""
        with contextlib.suppress(Exception):
            await self.leases.expire()


def cluster_adopter(settings: Settings, store: Store, holder: str) -> Adopter:
    """The adopter of a manager with these settings (its lease renewed by process ``holder``)."""
    leases = Leases(store, settings.manager_id, holder, settings.lease_seconds)
    retention = timedelta(hours=settings.cluster.lease_retention_hours)
    return Adopter(store, leases, enabled=settings.cluster.adopt, retention=retention)


__all__ = ["Adopted", "Adopter", "adopt", "cluster_adopter"]
