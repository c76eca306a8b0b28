"""Manager leases and adoption against a real SQLite store: one adopter per expired lease, and
the leases of replicas that never came back are deleted once nothing of theirs is left."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from toolserver.manager.adoption import Adopter, adopt
from toolserver.manager.leases import Leases
from toolserver.manager.models import ManagerLease, Ownership, ToolServerNode, utcnow
from toolserver.manager.store import Store, open_store
from toolserver.states import NodeStatus
from toolserver.testing import scratch_config


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    store = await open_store(scratch_config(tmp_path)["database_url"])
    try:
        yield store
    finally:
        await store.aclose()


async def _lease_ids(store: Store) -> set[str]:
    async with store._read() as s:
        return set((await s.scalars(select(ManagerLease.manager_id))).all())


async def _expire(store: Store, manager_id: str, adopted_ago: timedelta | None = None) -> None:
    """Move ``manager_id``'s deadline into the past (and its adoption ``adopted_ago``)."""
    values: dict[str, object] = {"deadline": utcnow() - timedelta(seconds=5)}
    if adopted_ago is not None:
        values["adopted_at"] = utcnow() - adopted_ago
    async with store._write() as s:
        await s.execute(update(ManagerLease).where(ManagerLease.manager_id == manager_id).values(**values))


async def _add_node(store: Store, manager_id: str) -> ToolServerNode:
    node = ToolServerNode.new(manager_id, "process", status=NodeStatus.RUNNING, ownership=Ownership.SESSION)
    async with store._write() as s:
        s.add(node)
    return node


async def test_an_expired_lease_is_adopted_by_one_replica_of_two(store: Store) -> None:
    dead = Leases(store, "dead", "p0", 0.5)
    await dead.renew()
    node = await _add_node(store, "dead")
    await _expire(store, "dead")
    won = await asyncio.gather(adopt(store, "dead", "a"), adopt(store, "dead", "b"))
    winners = [w for w in won if w is not None]
    assert len(winners) == 1 and winners[0].short_ids == [node.short_id]
    async with store._read() as s:
        moved = (await s.execute(select(ToolServerNode).where(ToolServerNode.id == node.id))).scalar_one()
    assert (moved.origin, moved.manager_id in {"a", "b"}) == ("dead", True)


async def test_leases_of_replicas_gone_for_good_are_deleted_once_nothing_is_left(store: Store) -> None:
    live = Leases(store, "live", "p1", 60)
    adopter = Adopter(store, live, retention=timedelta(hours=1))
    await live.renew()
    for name in ("gone-long-ago", "gone-recently", "gone-but-holding"):
        await Leases(store, name, "p", 60).renew()
        await _expire(store, name)
        assert await adopt(store, name, "live") is not None
    await _expire(store, "gone-long-ago", adopted_ago=timedelta(hours=2))
    await _expire(store, "gone-recently", adopted_ago=timedelta(minutes=5))
    await _expire(store, "gone-but-holding", adopted_ago=timedelta(hours=2))
    await _add_node(store, "gone-but-holding")  # it came back and made a node since: not gone

    assert await live.prune(timedelta(hours=1)) == ["gone-long-ago"]
    assert await _lease_ids(store) == {"live", "gone-recently", "gone-but-holding"}
    adopter.retention = timedelta(minutes=1)
    assert await adopter.prune() == ["gone-recently"]  # the checker's call, once per PRUNE_EVERY
    await _expire(store, "gone-but-holding", adopted_ago=timedelta(hours=2))
    assert await adopter.prune() == []  # not again so soon
    assert await _lease_ids(store) == {"live", "gone-but-holding"}

    # one that comes back after its lease was deleted simply gets a new one
    again = Leases(store, "gone-long-ago", "p2", 60)
    assert await again.renew() is False
    assert "gone-long-ago" in await _lease_ids(store)


async def test_a_renewed_lease_is_live_to_the_other_replicas(store: Store) -> None:
    """A renewal moves the deadline ahead (on SQLite it once stored a number there: every renewed
    lease then looked expired to the other replicas, and reading it failed)."""
    mine, theirs = Leases(store, "a", "p1", 30), Leases(store, "b", "p2", 30)
    for _ in range(2):  # the first renewal inserts the row, the second updates it
        await mine.renew()
        await theirs.renew()
    (seen,) = await theirs.others()
    assert (seen.manager_id, seen.expired, seen.adopted_by) == ("a", False, None)
    assert timedelta(seconds=25) < seen.deadline - utcnow() <= timedelta(seconds=30)
    assert await adopt(store, "a", "b") is None  # a live lease is not adoptable
    await mine.expire()
    (seen,) = await theirs.others()
    assert seen.expired
