"""Faults injected through subclasses of the real process runtime: nothing leaks, the manager serves on."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import inprocess_manager, node_processes
from toolserver.errors import RuntimeUnavailable
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


class SlowStartRuntime(ProcessRuntime):
    """Takes two seconds before starting a real node."""

    async def start(self, state: dict[str, Any]) -> NodeInfo:
        await asyncio.sleep(2)
        return await super().start(state)


async def test_client_that_leaves_during_the_create_leaves_nothing_behind(tmp_path: Path) -> None:
    async with inprocess_manager(tmp_path, SlowStartRuntime) as (url, app):
        async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=0.5) as http:
            with pytest.raises(httpx.ReadTimeout):
                await http.post("/get_cookie")
        store, manager_id = app.state.store, app.state.settings.manager_id
        for _ in range(200):  # the create finishes a moment later; its node must go, not stay
            await asyncio.sleep(0.05)
            if not app.state.sessions.busy and not await store.list_nodes(manager_id):
                break
        await _no_leftovers(tmp_path, app)


async def test_failed_start_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with (
        inprocess_manager(tmp_path, CrashingRuntime) as (url, _),
        httpx.AsyncClient(base_url=url, trust_env=False, timeout=30) as http,
    ):
        assert (await http.post("/get_cookie")).status_code == 503
    failed = [r for r in caplog.records if getattr(r, "event", None) == "failed"]
    assert failed and failed[0].levelname == "WARNING" and "exit code 3" in failed[0].getMessage()


class GoneDuringStartRuntime(ProcessRuntime):
    """Creates real nodes, then loses its backend: start and removal fail until ``back`` is set."""

    back = False

    async def start(self, state: dict[str, Any]) -> NodeInfo:
        raise RuntimeUnavailable("backend went away")

    async def remove(self, state: dict[str, Any]) -> None:
        if not self.back:
            raise RuntimeUnavailable("backend went away")
        await super().remove(state)


async def test_a_failed_start_that_cannot_be_cleaned_up_yet_is_cleaned_up_later(tmp_path: Path) -> None:
    async with (
        inprocess_manager(tmp_path, GoneDuringStartRuntime) as (url, app),
        httpx.AsyncClient(base_url=url, trust_env=False, timeout=30) as http,
    ):
        r = await http.post("/get_cookie")
        assert r.status_code == 503 and "runtime unavailable" in r.json()["detail"]
        store, manager_id = app.state.store, app.state.settings.manager_id
        [record] = await store.list_nodes(manager_id)
        assert record.ownership == "releasing"  # not left starting until its deadline
        app.state.sessions.runtime.back = True
        for _ in range(100):  # the checker ticks every 0.1 s
            await asyncio.sleep(0.05)
            if not await store.list_nodes(manager_id):
                break
        await _no_leftovers(tmp_path, app)
