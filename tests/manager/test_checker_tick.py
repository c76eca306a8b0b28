"""One checker tick against a real SQLite store and the real process runtime.

Several manager processes may share one database and one manager id (workers of one manager); only
one of them runs the checker. A record says who owns it: a ``starting`` one belongs to the process
that creates it until its deadline, and is removed once that process is gone or the deadline passed.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from toolserver.manager.activity import ActivityBuffer
from toolserver.manager.checker import NodeChecker
from toolserver.manager.models import Ownership, ToolServerNode, utcnow
from toolserver.manager.sessions import SessionService
from toolserver.manager.settings import Settings, load_settings
from toolserver.manager.store import Store, open_store, this_process
from toolserver.runtimes import create_runtime
from toolserver.runtimes.base import NodeInfo, NodeSpec, Runtime
from toolserver.runtimes.process import ProcessRuntime
from toolserver.states import NodeStatus
from toolserver.testing import scratch_config


def _dead_process() -> str:
    """The ``creator`` name of a manager process that has exited."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "from toolserver.manager.store import this_process; print(this_process())"],
        stdout=subprocess.PIPE,
        text=True,
    )
    out, _ = proc.communicate(timeout=30)
    return out.strip()


def _record(manager_id: str, status: str, ownership: Ownership, **fields: Any) -> ToolServerNode:
    return ToolServerNode.new(manager_id, "process", status=status, ownership=ownership, **fields)


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[tuple[Settings, Store, Runtime]]:
    settings = load_settings(None, **scratch_config(tmp_path), isolation="process", manager_id="worker-test")
    store = await open_store(settings.database_url)
    runtime = create_runtime(settings.runtime_config, settings.runtime_context())
    try:
        yield settings, store, runtime
    finally:
        await runtime.aclose()
        await store.aclose()


def _checker(settings: Settings, store: Store, runtime: Runtime) -> NodeChecker:
    activity = ActivityBuffer(store)
    return NodeChecker(SessionService(settings, store, runtime, activity), activity=activity)


async def test_tick_removes_creates_whose_process_is_gone_and_spares_live_ones(
    parts: tuple[Settings, Store, Runtime],
) -> None:
    settings, store, runtime = parts
    soon = utcnow() + timedelta(seconds=60)
    # being created by a live process (this one) and by one that exited: both have a node directory
    live = _record(
        settings.manager_id, NodeStatus.CREATED, Ownership.STARTING, creator=this_process(), deadline=soon
    )
    cut = _record(
        settings.manager_id, NodeStatus.CREATED, Ownership.STARTING, creator=_dead_process(), deadline=soon
    )
    # a live creator that overran its deadline; a session whose node is gone
    late = _record(
        settings.manager_id, NodeStatus.NEW, Ownership.STARTING, creator=this_process(), deadline=utcnow()
    )
    vanished = _record(settings.manager_id, NodeStatus.RUNNING, Ownership.SESSION)
    # cut short between making its directory and writing its mark: the runtime does not list it
    halfway = _record(settings.manager_id, NodeStatus.NEW, Ownership.STARTING, creator=_dead_process())
    for node in (live, cut, late, vanished, halfway):
        await store.add_node(node)
    for node in (live, cut):
        await runtime.create(NodeSpec(node.short_id, settings.manager_id, node.secret))
    debris = settings.data_dir / "nodes" / halfway.short_id
    debris.mkdir(parents=True)

    report = await _checker(settings, store, runtime).tick()

    assert sorted(report.removed) == sorted([cut.id, late.id, halfway.id])
    assert report.deleted == [vanished.id]
    assert {n.id for n in await store.list_nodes(settings.manager_id)} == {live.id}
    assert {i.node_id for i in await runtime.list(settings.manager_id)} == {live.short_id}
    assert not debris.exists()


class ChangingStore(Store):
    """Changes one record right after the checker has read them, as another process would:
    deletes it (a release) or, with ``hand_over``, hands it over."""

    victim: str | None = None
    hand: bool = False

    async def list_nodes(self, manager_id: str) -> list[ToolServerNode]:
        nodes = await super().list_nodes(manager_id)
        if self.victim is not None:
            await (self.hand_over(self.victim) if self.hand else self.delete_nodes([self.victim]))
        return nodes


async def test_tick_tolerates_a_record_released_under_it(tmp_path: Path) -> None:
    settings = load_settings(None, **scratch_config(tmp_path), isolation="process", manager_id="vanish-test")
    store = ChangingStore(settings.database_url)
    await store.migrate()
    runtime = create_runtime(settings.runtime_config, settings.runtime_context())
    try:
        nodes = [_record(settings.manager_id, NodeStatus.NEW, Ownership.SESSION) for _ in range(3)]
        for node in nodes:
            await store.add_node(node)
            info = await runtime.create(NodeSpec(node.short_id, settings.manager_id, node.secret))
            await store.update_node(node.id, runtime_state=info.state)
        store.victim = nodes[0].id
        checker = _checker(settings, store, runtime)
        checker.activity.touch(nodes[0].id)
        checker.activity.touch(nodes[1].id)

        report = await checker.tick()  # status Created -> created for all three, one of them gone

        assert report.errors == 0
        left = {n.id: n for n in await store.list_nodes(settings.manager_id)}
        assert set(left) == {nodes[1].id, nodes[2].id}
        assert all(n.status == NodeStatus.CREATED for n in left.values())
        assert left[nodes[1].id].last_req_time > nodes[1].last_req_time
        store.victim = None
        report = await checker.tick()  # the vanished record's node is an orphan now
        assert report.orphans == [nodes[0].short_id] and report.errors == 0
    finally:
        await runtime.aclose()
        await store.aclose()


async def test_tick_leaves_a_create_handed_over_under_it(tmp_path: Path) -> None:
    settings = load_settings(
        None, **scratch_config(tmp_path), isolation="process", manager_id="handover-test"
    )
    store = ChangingStore(settings.database_url)
    await store.migrate()
    runtime = create_runtime(settings.runtime_config, settings.runtime_context())
    try:
        # past its deadline (its creator slow, on another host say), handed over after the read
        late = _record(settings.manager_id, NodeStatus.CREATED, Ownership.STARTING, deadline=utcnow())
        await store.add_node(late)
        info = await runtime.create(NodeSpec(late.short_id, settings.manager_id, late.secret))
        await store.update_node(late.id, runtime_state=info.state)
        store.victim, store.hand = late.id, True

        report = await _checker(settings, store, runtime).tick()

        assert report.removed == [] and report.errors == 0
        [kept] = await store.list_nodes(settings.manager_id)
        assert kept.ownership == Ownership.SESSION
        assert [i.node_id for i in await runtime.list(settings.manager_id)] == [late.short_id]
    finally:
        await runtime.aclose()
        await store.aclose()


class CreatedWhileListing(ProcessRuntime):
    """Lists its nodes, then lets a create finish before the checker reads the records, as a
    request of the same manager does while a tick over many nodes is under way: the list has not
    seen that node, and its record says it runs."""

    finish: Callable[[], Awaitable[None]] | None = None

    async def list(self, manager_id: str) -> list[NodeInfo]:
        infos = await super().list(manager_id)
        if self.finish is not None:
            finish, self.finish = self.finish, None
            await finish()
        return infos


async def test_tick_keeps_a_session_whose_create_finished_while_the_runtime_listed(tmp_path: Path) -> None:
    settings = load_settings(None, **scratch_config(tmp_path), isolation="process", manager_id="race-test")
    store = await open_store(settings.database_url)
    runtime = CreatedWhileListing(settings.runtime_config, settings.runtime_context())
    soon = utcnow() + timedelta(seconds=60)
    node = _record(
        settings.manager_id, NodeStatus.NEW, Ownership.STARTING, creator=this_process(), deadline=soon
    )
    await store.add_node(node)

    async def finish() -> None:  # what SessionService's create writes when the node is up
        info = await runtime.create(NodeSpec(node.short_id, settings.manager_id, node.secret))
        info = await runtime.start(info.state)
        await store.update_node(
            node.id,
            status=info.status,
            runtime_state=info.state,
            ownership=Ownership.SESSION,
            creator=None,
            deadline=None,
            status_changed_at=utcnow(),
        )

    runtime.finish = finish
    checker = _checker(settings, store, runtime)
    try:
        first = await checker.tick()
        second = await checker.tick()  # this list sees the node
        records = {n.id: n for n in await store.list_nodes(settings.manager_id)}
        listed = {i.node_id: i for i in await runtime.list(settings.manager_id)}
    finally:
        for info in await runtime.list(settings.manager_id):
            await runtime.kill(info.state)
            await runtime.remove(info.state)
        await runtime.aclose()
        await store.aclose()
    assert first.deleted == [] and second.deleted == []
    assert node.id in records and records[node.id].status == NodeStatus.RUNNING
    assert listed[node.short_id].status == NodeStatus.RUNNING
