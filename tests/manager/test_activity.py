"""Buffered last request times against a real SQLite store: no node's time can hold up another's."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from toolserver.errors import DatabaseUnavailable
from toolserver.manager.activity import ActivityBuffer
from toolserver.manager.models import Ownership, ToolServerNode, utcnow
from toolserver.manager.store import Store
from toolserver.testing import scratch_config


class FaultyStore(Store):
    """Fails writes of last request times: all of them while ``down``, or any batch with ``poison``."""

    down = False
    poison: str | None = None

    async def touch_nodes(self, times: Mapping[str, datetime]) -> None:
        if self.down:
            raise DatabaseUnavailable("database unavailable: test outage")
        if self.poison in times:
            raise ValueError("a write that fails")
        await super().touch_nodes(times)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[FaultyStore]:
    store = FaultyStore(scratch_config(tmp_path)["database_url"])
    await store.migrate()
    try:
        yield store
    finally:
        await store.aclose()


async def _nodes(store: Store, n: int) -> list[ToolServerNode]:
    old = utcnow() - timedelta(hours=1)
    nodes = [ToolServerNode.new("activity", "process", at=old, ownership=Ownership.SESSION) for _ in range(n)]
    for node in nodes:
        await store.add_node(node)
    return nodes


async def _times(store: Store) -> dict[str, datetime]:
    return {n.id: n.last_req_time for n in await store.list_nodes("activity")}


async def test_a_released_node_does_not_hold_up_the_others(store: FaultyStore) -> None:
    released, kept = await _nodes(store, 2)
    activity = ActivityBuffer(store)
    activity.touch(released.id)
    activity.touch(kept.id)
    when = activity.pending(kept.id)
    await store.delete_nodes([released.id])  # released between its last request and the flush

    await activity.flush()

    assert activity.waiting == 0
    assert (await _times(store)) == {kept.id: when}
    activity.touch(kept.id)  # and the next flush works too
    when = activity.pending(kept.id)
    await activity.flush()
    assert activity.waiting == 0 and (await _times(store)) == {kept.id: when}


async def test_times_only_move_forward(store: FaultyStore) -> None:
    [node] = await _nodes(store, 1)
    newer = utcnow()
    await store.touch_nodes({node.id: newer})
    await store.touch_nodes({node.id: newer - timedelta(seconds=5)})  # a late, older batch
    assert (await _times(store))[node.id] == newer


async def test_a_failing_batch_is_written_one_by_one(store: FaultyStore) -> None:
    bad, good = await _nodes(store, 2)
    store.poison = bad.id
    activity = ActivityBuffer(store)
    activity.touch(bad.id)
    activity.touch(good.id)

    await activity.flush()

    times = await _times(store)
    assert times[good.id] > good.last_req_time
    assert times[bad.id] == bad.last_req_time
    assert activity.waiting == 0  # the bad one is dropped, not retried forever


async def test_an_outage_keeps_times_in_memory_bounded(store: FaultyStore) -> None:
    nodes = await _nodes(store, 4)
    activity = ActivityBuffer(store, max_pending=3)
    store.down = True
    for node in nodes[:3]:
        activity.touch(node.id)
    await activity.flush()
    assert activity.waiting == 3
    activity.touch(nodes[3].id)  # a fourth node while full: dropped, the others stay
    assert activity.waiting == 3 and activity.dropped == 1
    activity.touch(nodes[0].id)
    latest = activity.pending(nodes[0].id)

    store.down = False
    await activity.flush()

    times = await _times(store)
    assert activity.waiting == 0
    assert times[nodes[0].id] == latest
    assert all(times[n.id] > n.last_req_time for n in nodes[:3])
