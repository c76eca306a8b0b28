"""The sandbox tier's template (issue 14): node servers forked from one pre-imported process must be
as confined and as fresh as cold ones — own namespaces, uid, no capabilities, none of the
template's descriptors or environment — and the machinery around them (the waiter, the template
itself) must fail the way a user expects: a killed server ends its sandbox, a killed template is
started again."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
import pytest_asyncio

from toolserver.runtimes.base import EXITED
from toolserver.runtimes.sandbox import SandboxRuntime
from toolserver.runtimes.sandbox_jail import INNER_UID
from toolserver.testing import cgroup_processes
from toolserver.testing.conformance import SHELL, ConformanceHarness
from toolserver.testing.tiers import SANDBOX

NAMESPACES = ("user", "mnt", "pid", "net", "ipc", "uts", "cgroup")
CANARY = "TOOLSERVER_TEST_MANAGER_ONLY"


@pytest_asyncio.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[ConformanceHarness]:
    if SANDBOX.unavailable():
        pytest.skip(f"tier sandbox: {SANDBOX.unavailable()}")
    harness = ConformanceHarness(SANDBOX, tmp_path / "data", f"tpl-{secrets.token_hex(4)}", 60.0, 1.0)
    try:
        yield harness
    finally:
        await harness.aclose()


def _server(node_id: str) -> psutil.Process:
    """The node's server: the one process of its cgroup that is the node (not the sandbox's)."""
    found = [p for p in cgroup_processes([node_id]) if p.cmdline()[1:4] == ["-m", "toolserver", "node"]]
    assert len(found) == 1, f"node {node_id} has {len(found)} servers: {[p.cmdline() for p in found]}"
    return found[0]


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def _namespaces(pid: int) -> dict[str, str]:
    return {ns: os.readlink(f"/proc/{pid}/ns/{ns}") for ns in NAMESPACES}


def _descriptors(pid: int) -> dict[int, str]:
    found = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            found[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
    return found


@pytest.mark.asyncio
async def test_a_forked_server_is_confined_like_a_cold_one(
    sandbox: ConformanceHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CANARY, "the manager's own environment")
    runtime = sandbox.runtime()
    assert isinstance(runtime, SandboxRuntime) and runtime.template is not None
    cold_tier = dataclasses.replace(SANDBOX, runtime_config={"template": False})
    cold = cold_tier.make_runtime(sandbox.data_dir, sandbox.manager_id, stop_grace_seconds=1.0)
    sandbox.made.append(cold)
    spec, info = await sandbox.started(runtime, sandbox.spec(GREETING="forked"))
    cold_spec, cold_info = await sandbox.started(cold)

    assert runtime.template._proc is not None
    template = runtime.template._proc.pid
    forked, reference = _server(spec.node_id), _server(cold_spec.node_id)
    # the same credentials as a cold node's server, and nothing of the template's (root)
    for proc in (forked, reference):
        status = _status(proc.pid)
        mark_uid = proc.uids().real
        assert mark_uid >= 1000 and proc.uids() == (mark_uid,) * 3, proc.uids()
        assert status["Groups"] == "", status["Groups"]
        for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[caps], 16) == 0, f"{caps} {status[caps]} in {proc.cmdline()}"
        assert status["NoNewPrivs"] == "1"
    assert forked.uids().real != reference.uids().real
    # in every namespace of its own sandbox: not the template's, not the other node's
    ours, theirs, host = _namespaces(forked.pid), _namespaces(reference.pid), _namespaces(template)
    for ns in NAMESPACES:
        assert ours[ns] != host[ns], f"the forked node shares the template's {ns} namespace"
        assert ours[ns] != theirs[ns], f"two nodes share a {ns} namespace"
    # a process inside the node's PID namespace whose parent is the sandbox's init, as a cold one
    assert forked.parent() is not None and forked.parent().name() == "bwrap"
    assert forked.pid in {p.pid for p in psutil.Process(info.state["pid"]).children(recursive=True)}
    # none of the template's descriptors: its control socket is not among the node's
    template_fds = {t for t in _descriptors(template).values() if t.startswith(("socket:", "pipe:"))}
    leaked = {fd: target for fd, target in _descriptors(forked.pid).items() if target in template_fds}
    assert not leaked, f"the node holds the template's descriptors {leaked}"
    # the node's environment, not the manager's or the template's; its own files and secret
    out = await sandbox.tool(info, spec, SHELL, command="echo $GREETING; id -u; env | grep -c TEST_MANAGER")
    output = out["data"]["output"].split()
    assert output[:2] == ["forked", str(INNER_UID)], out
    assert output[2] == "0", f"the manager's environment reached the node: {out}"
    await sandbox.write(info, spec, "mine.txt", "only here")
    listing = await sandbox.tool(cold_info, cold_spec, SHELL, command="ls /workspace")
    assert "mine.txt" not in str(listing)
    async with sandbox.http(info, None) as client:  # without the node's secret
        answer = await client.post("/execute_tool", json={"tool_name": SHELL, "arguments": {}})
    assert answer.status_code == 401


@pytest.mark.asyncio
async def test_a_killed_server_ends_its_sandbox_and_a_stop_is_graceful(sandbox: ConformanceHarness) -> None:
    runtime = sandbox.runtime()
    spec, info = await sandbox.started(runtime)
    _server(spec.node_id).kill()
    stopped = await sandbox.stopped(runtime, info.state)
    assert stopped.status == EXITED
    await asyncio.sleep(0.2)
    assert cgroup_processes([spec.node_id]) == [], "processes outlived their node"

    restarted = await runtime.start(stopped.state)
    restarted = await sandbox.ready(runtime, restarted.state)
    # a stop signals the server, which shuts down on its own well before the grace runs out
    server = _server(spec.node_id)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await runtime.stop(restarted.state, 10.0)
    assert loop.time() - began < 5.0, "the server did not get the stop's SIGTERM"
    assert not server.is_running()


@pytest.mark.asyncio
async def test_a_killed_template_is_started_again(sandbox: ConformanceHarness) -> None:
    runtime = sandbox.runtime()
    assert isinstance(runtime, SandboxRuntime) and runtime.template is not None
    first_spec, first = await sandbox.started(runtime)
    assert runtime.template._proc is not None
    old = runtime.template._proc.pid
    os.kill(old, signal.SIGKILL)
    spec, info = await sandbox.started(runtime)
    assert runtime.template._proc is not None and runtime.template._proc.pid != old
    out = await sandbox.tool(info, spec, SHELL, command="echo fine")
    assert "fine" in str(out)
    # the node forked by the dead template still serves: it never depended on it
    assert "still" in str(await sandbox.tool(first, first_spec, SHELL, command="echo still"))
