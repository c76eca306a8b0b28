"""Faults injected through subclasses of the real process runtime: nothing leaks, the manager serves on."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import httpx

from tests.support import inprocess_manager, node_processes
from toolserver.runtimes.base import STARTING, NodeInfo
from toolserver.runtimes.process import ProcessRuntime


class NeverHealthyRuntime(ProcessRuntime):
    """Starts real node processes but never reports them healthy."""

    async def inspect(self, state: dict[str, Any]) -> NodeInfo:
        info = await super().inspect(state)
        info.health = STARTING
        return info


class CrashingRuntime(ProcessRuntime):
    """Starts a node process that exits at once."""

    def command(self, fd: int, node_dir: Path) -> list[str]:
        return [sys.executable, "-c", "import sys; sys.exit(3)"]


async def _no_leftovers(root: Path, app: Any) -> None:
    assert await app.state.store.list_nodes(app.state.settings.manager_id) == []
    assert node_processes(root) == []
    nodes_dir = root / "data" / "nodes"
    assert not nodes_dir.exists() or list(nodes_dir.iterdir()) == []


async def test_creation_timeout_answers_503_and_leaks_nothing(tmp_path: Path) -> None:
    async with (
        inprocess_manager(tmp_path, NeverHealthyRuntime, node={"creation_wait_seconds": 1.5}) as (
            url,
            app,
        ),
        httpx.AsyncClient(base_url=url, trust_env=False) as http,
    ):
        r = await http.post("/get_cookie")
        assert r.status_code == 503
        assert "not ready after 1.5 s" in r.json()["detail"]
        assert "node_id" not in r.cookies
        await _no_leftovers(tmp_path, app)
        assert (await http.get("/alive")).json() == "alive"


async def test_node_that_exits_at_start_answers_503_at_once(tmp_path: Path) -> None:
    async with (
        inprocess_manager(tmp_path, CrashingRuntime, node={"creation_wait_seconds": 30}) as (
            url,
            app,
        ),
        httpx.AsyncClient(base_url=url, trust_env=False, timeout=30) as http,
    ):
        r = await http.post("/get_cookie")
        assert r.status_code == 503
        assert "exited while starting (exit code 3)" in r.json()["detail"]
        assert r.elapsed.total_seconds() < 15
        await _no_leftovers(tmp_path, app)
