"""One checker tick against a real SQLite store and the real process runtime.

Several manager processes may share one database and one manager id (workers of one manager); only
one of them runs the checker, and it cannot see what the others are doing. A record whose node is
being created by another worker exists before the node shows up in the runtime's list.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from toolserver.manager.checker import NodeChecker
from toolserver.manager.models import STATUS_CREATED, ToolServerNode, utcnow
from toolserver.manager.settings import load_settings
from toolserver.manager.store import open_store
from toolserver.runtimes import create_runtime
from toolserver.runtimes.base import CREATED, RUNNING
from toolserver.testing import scratch_config


def _record(manager_id: str, status: str, age_seconds: float) -> ToolServerNode:
    at = utcnow() - timedelta(seconds=age_seconds)
    return ToolServerNode.new(manager_id, "process", at=at, status=status)


async def test_tick_spares_nodes_another_worker_is_creating(tmp_path: Path) -> None:
    settings = load_settings(
        None,
        **scratch_config(tmp_path),
        manager_id="worker-test",
        node={"creation_wait_seconds": 30},
    )
    store = await open_store(settings.database_url)
    runtime = create_runtime(settings.runtime_config, settings.runtime_context())
    try:
        # just inserted (the seed's default status), and just created by the runtime: both young
        inserted = _record(settings.manager_id, STATUS_CREATED, 0.5)
        created = _record(settings.manager_id, CREATED, 0.5)
        # never started within creation_wait_seconds, and a running node whose runtime object is gone
        stuck = _record(settings.manager_id, CREATED, 60)
        vanished = _record(settings.manager_id, RUNNING, 5)
        for node in (inserted, created, stuck, vanished):
            await store.add_node(node)

        report = await NodeChecker(settings, store, runtime).tick()

        assert sorted(report.deleted) == sorted([stuck.id, vanished.id])
        left = {n.id for n in await store.list_nodes(settings.manager_id)}
        assert left == {inserted.id, created.id}
    finally:
        await runtime.aclose()
        await store.aclose()
