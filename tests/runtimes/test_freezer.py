"""Pausing local nodes: the cgroup v1 freezer where it is writable, SIGSTOP/SIGCONT where it is not."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from toolserver.runtimes.base import NodeSpec, RuntimeContext
from toolserver.runtimes.freezer import FREEZER_ROOT, Freezer
from toolserver.runtimes.process import ProcessConfig, ProcessRuntime, _marked_processes
from toolserver.testing import wait_until


class SignalsOnlyRuntime(ProcessRuntime):
    """The process runtime on a machine without a writable freezer hierarchy."""

    def __init__(self, config: ProcessConfig, context: RuntimeContext) -> None:
        super().__init__(config, context)
        self.freezer = Freezer(_marked_processes, root=Path(context.data_dir) / "no-freezer")


@pytest.fixture(params=["cgroup", "signals"])
async def runtime(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ProcessRuntime]:
    cls = ProcessRuntime if request.param == "cgroup" else SignalsOnlyRuntime
    rt = cls(ProcessConfig(), RuntimeContext(data_dir=tmp_path, manager_id="freezer-test"))
    if request.param == "cgroup" and not rt.freezer.cgroup:
        pytest.skip(f"{FREEZER_ROOT} is not writable here")
    yield rt
    await rt.aclose()


async def _healthy(rt: ProcessRuntime, state: dict[str, Any]) -> None:
    for _ in range(600):
        if (await rt.inspect(state)).health == "healthy":
            return
        await asyncio.sleep(0.05)
    raise AssertionError("node never became healthy")


async def test_pause_freezes_every_process_of_the_node_and_resume_thaws_them(runtime: ProcessRuntime) -> None:
    info = await runtime.create(NodeSpec("frz" + runtime.freezer.method[:3], "freezer-test", "s3cret"))
    state = (await runtime.start(info.state)).state
    try:
        await _healthy(runtime, state)
        paused = await runtime.pause(state)
        assert paused.status == "paused"
        assert (await runtime.inspect(state)).status == "paused"
        assert [i.status for i in await runtime.list("freezer-test")] == ["paused"]
        procs = _marked_processes(info.node_id)
        assert procs
        if runtime.freezer.method == "cgroup":
            group = runtime.freezer.group(info.node_id)
            assert (group / "freezer.state").read_text().strip() == "FROZEN"
            members = {int(p) for p in (group / "cgroup.procs").read_text().split()}
            assert {p.pid for p in procs} <= members
        else:
            wait_until(lambda: all(p.status() == psutil.STATUS_STOPPED for p in procs), timeout=5)
        resumed = await runtime.resume(state)
        assert resumed.status == "running" and resumed.health == "healthy"
        assert all(p.status() != psutil.STATUS_STOPPED for p in procs)
        # a paused node still stops (a frozen process would ignore SIGTERM)
        await runtime.pause(state)
        await runtime.stop(state, grace=1)
        assert (await runtime.inspect(state)).status == "exited"
        assert _marked_processes(info.node_id) == []
    finally:
        await runtime.remove(state)
    if runtime.freezer.method == "cgroup":
        assert not runtime.freezer.group(info.node_id).exists()
