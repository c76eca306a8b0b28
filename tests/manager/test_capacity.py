"""node.max_nodes under concurrent load: exactly max_nodes sessions, the rest 429, nothing leaked."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx

from tests.support import ManagerProcess


async def test_fifty_concurrent_get_cookie_with_max_nodes_twenty(
    manager_factory: Callable[..., ManagerProcess],
) -> None:
    manager = manager_factory(
        node={"max_nodes": 20, "creation_wait_seconds": 120, "health_check_interval": 1}
    )
    async with httpx.AsyncClient(base_url=manager.url, timeout=180, trust_env=False) as http:
        answers = await asyncio.gather(*(http.post("/get_cookie") for _ in range(50)))
        codes = sorted(r.status_code for r in answers)
        assert codes.count(200) == 20, codes
        assert codes.count(429) == 30, codes
        assert all(r.headers.get("Retry-After") for r in answers if r.status_code == 429)
        assert "node.max_nodes" in next(r for r in answers if r.status_code == 429).json()["detail"]
        cookies = [r.cookies["node_id"] for r in answers if r.status_code == 200]
        assert len(set(cookies)) == 20
        assert len(manager.nodes()) == 20
        assert len(manager.node_processes()) == 20
        # every session answers, then all are released
        checks = await asyncio.gather(
            *(http.post("/get_available_tools", json={}, headers={"Cookie": f"node_id={c}"}) for c in cookies)
        )
        assert all(r.status_code == 200 for r in checks)
        released = await asyncio.gather(
            *(http.post("/release_session", headers={"Cookie": f"node_id={c}"}) for c in cookies)
        )
        assert all(r.status_code == 200 for r in released)
    assert manager.nodes() == []
    assert manager.node_processes() == []
    assert manager.node_dirs() == []


async def test_max_nodes_holds_across_worker_processes(
    manager_factory: Callable[..., ManagerProcess],
) -> None:
    node = {"max_nodes": 4, "creation_wait_seconds": 120, "health_check_interval": 1}
    first = manager_factory(node=node)
    second = manager_factory(start=False, node=node)
    second.share_with(first).start()  # two worker processes of one manager, one SQLite file
    async with httpx.AsyncClient(timeout=180, trust_env=False) as http:
        answers = await asyncio.gather(*(http.post(f"{m.url}/get_cookie") for m in [first, second] * 6))
        codes = sorted(r.status_code for r in answers)
        failed = {r.text for r in answers if r.status_code not in (200, 429)}
        assert codes == [200] * 4 + [429] * 8, f"{codes}: {failed}\n{first.tail(40)}\n{second.tail(40)}"
        assert len(first.nodes()) == 4
        for cookie in [r.cookies["node_id"] for r in answers if r.status_code == 200]:
            await http.post(f"{first.url}/release_session", headers={"Cookie": f"node_id={cookie}"})
    assert first.nodes() == []
