"""The warm pool: sessions get ready nodes at once, never the same node twice, and the pool refills."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx

from tests.support import ManagerProcess, wait_until
from toolserver.client import ToolServerClient


def _pooled(manager: ManagerProcess) -> list[str]:
    return [
        r["id"]
        for r in manager.query(
            "SELECT id FROM toolserver_nodes WHERE pooled AND status = 'running' AND health = 'healthy'"
        )
    ]


def test_claim_from_pool_then_refill(manager_factory: Callable[..., ManagerProcess]) -> None:
    manager = manager_factory(
        node={"warm_pool_size": 2, "idling_close_minutes": 0.005, "health_check_interval": 0.1}
    )
    pool = wait_until(lambda: len(_pooled(manager)) == 2 and _pooled(manager), timeout=30, what="pool filled")
    time.sleep(1.0)  # longer than idling_close_minutes: pool nodes are not idle-closed
    assert sorted(_pooled(manager)) == sorted(pool)
    with ToolServerClient(manager.url) as client:
        session = client.get_cookie()
        assert session.node_id in pool
        record = manager.node(session.node_id)
        assert not record["pooled"] and record["status"] == "running"
        # a fresh node: empty workspace
        tree = session.get_workspace_structure()
        assert "hello" not in str(tree)
        wait_until(lambda: len(_pooled(manager)) == 2, timeout=30, what="pool refilled")
        assert session.node_id not in _pooled(manager)
        session.release()


async def test_two_managers_on_one_database_never_share_a_node(
    manager_factory: Callable[..., ManagerProcess],
) -> None:
    first = manager_factory(node={"warm_pool_size": 4, "health_check_interval": 0.2})
    second = manager_factory(start=False, node={"warm_pool_size": 4, "health_check_interval": 0.2})
    second.share_with(first).start()  # two worker processes of one manager
    wait_until(lambda: len(_pooled(first)) >= 4, timeout=60, what="pool filled")
    async with httpx.AsyncClient(timeout=120, trust_env=False) as http:
        answers = await asyncio.gather(*(http.post(f"{m.url}/get_cookie") for m in [first, second] * 4))
        assert [r.status_code for r in answers] == [200] * 8
        cookies = [r.cookies["node_id"] for r in answers]
        assert len(set(cookies)) == 8
        addresses = {(first.node(c)["ip"], first.node(c)["port"]) for c in cookies}
        assert len(addresses) == 8
        for c in cookies:
            await http.post(f"{first.url}/release_session", headers={"Cookie": f"node_id={c}"})
    second.stop()
