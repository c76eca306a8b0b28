"""The sandbox runtime on its own: pause / resume (cgroup freezer), fork (a copy of the workspace),
preflight's refusal, and what it trusts (nothing written where the node could write it). The
process runtime's trust fixes are here too: a planted mark names no pid or directory it acts on."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
import pytest_asyncio

from tests.support import ManagerProcess
from toolserver.errors import ConfigError, NodeNotFound
from toolserver.runtimes.base import EXITED, PAUSED, RUNNING, NodeInfo
from toolserver.runtimes.health import node_healthy
from toolserver.runtimes.process import MARK_FILE
from toolserver.runtimes.sandbox import SandboxRuntime
from toolserver.testing.conformance import SHELL, ConformanceHarness
from toolserver.testing.tiers import PROCESS, SANDBOX, Tier


async def _harness(tier: Tier, tmp_path: Path) -> ConformanceHarness:
    return ConformanceHarness(tier, tmp_path / "data", f"sbx-{secrets.token_hex(4)}", 60.0, 1.0)


@pytest_asyncio.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[ConformanceHarness]:
    if SANDBOX.unavailable():
        pytest.skip(f"tier sandbox: {SANDBOX.unavailable()}")
    harness = await _harness(SANDBOX, tmp_path)
    try:
        yield harness
    finally:
        await harness.aclose()


@pytest.mark.asyncio
async def test_pause_freezes_and_resume_thaws_with_the_processes_kept(sandbox: ConformanceHarness) -> None:
    runtime = sandbox.runtime()
    assert {"pause", "fork"} <= runtime.capabilities
    spec, info = await sandbox.started(runtime)
    await sandbox.tool(info, spec, SHELL, command="sleep 4242 >/dev/null 2>&1 &", run_async=True)
    pids_before = {p.pid for p in psutil.process_iter(["cmdline"]) if "4242" in (p.info["cmdline"] or [])}
    paused = await runtime.pause(info.state)
    assert paused.status == PAUSED
    assert (await runtime.inspect(info.state)).status == PAUSED
    assert not await node_healthy(info.host, info.port), "a paused node still answers"
    resumed = await runtime.resume(info.state)
    assert resumed.status == RUNNING
    await sandbox.ready(runtime, info.state)
    pids_after = {p.pid for p in psutil.process_iter(["cmdline"]) if "4242" in (p.info["cmdline"] or [])}
    assert pids_before and pids_before == pids_after, "resume lost the node's processes"
    assert (await runtime.resume(info.state)).status == RUNNING  # resuming a running node: no-op


@pytest.mark.asyncio
async def test_a_node_listed_as_it_starts_is_running_and_survives(sandbox: ConformanceHarness) -> None:
    """A checker tick that lists a node the moment its start returns sees it running, and its
    reaping of dead nodes leaves it alone (it used to see a process not yet in its cgroup, call
    the node dead and SIGKILL the run that was starting)."""
    runtime = sandbox.runtime()
    for _ in range(5):
        spec = sandbox.spec()
        created = await runtime.create(spec)
        sandbox.states.append(created.state)
        started = await runtime.start(created.state)
        (listed,) = [i for i in await runtime.list(sandbox.manager_id) if i.node_id == spec.node_id]
        assert listed.status == RUNNING, f"listed as {listed.status} ({listed.detail}) right after its start"
        await sandbox.ready(runtime, started.state)
        await runtime.remove(started.state)


@pytest.mark.asyncio
async def test_lists_see_a_killed_node_and_a_restarted_one_and_keep_no_descriptor(
    sandbox: ConformanceHarness,
) -> None:
    """After its first full check a running node is answered by a pidfd of its process: its death
    shows at the next list all the same, its restart (a new process) is checked afresh, and a node
    removed leaves no descriptor open in the manager."""
    runtime = sandbox.runtime()
    pidfds_before = _pidfds()
    spec, info = await sandbox.started(runtime)

    async def listed() -> NodeInfo:
        (found,) = [i for i in await runtime.list(sandbox.manager_id) if i.node_id == spec.node_id]
        return found

    assert (await listed()).status == RUNNING
    assert (await listed()).status == RUNNING  # the second list asks the pidfd
    server = json.loads((Path(info.state["dir"]) / MARK_FILE).read_text())["pid"]
    os.kill(server, signal.SIGKILL)
    await sandbox.until(runtime, info.state, lambda i: i.status == EXITED, "exited")
    assert (await listed()).status == EXITED
    info = await runtime.start(info.state)  # a new server, a new process to check
    await sandbox.ready(runtime, info.state)
    assert (await listed()).status == RUNNING
    assert (await listed()).status == RUNNING
    assert _pidfds() > pidfds_before
    await runtime.remove(info.state)
    await runtime.list(sandbox.manager_id)
    assert _pidfds() == pidfds_before, "the removed node's pidfd is still open"


@pytest.mark.asyncio
async def test_a_node_starts_when_the_manager_holds_more_than_1024_descriptors(
    sandbox: ConformanceHarness,
) -> None:
    """A manager of a thousand nodes holds more than 1,024 descriptors (their pidfds, upstream
    connections): the sandbox's start must not wait on them with select(), whose limit that is
    (the 1,000-session benchmark got 503s 'filedescriptor out of range in select()')."""
    runtime = sandbox.runtime()
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        _spec, info = await sandbox.started(runtime)
        assert info.status == RUNNING
    finally:
        for fd in held:
            os.close(fd)


def _pidfds() -> int:
    """Open pidfds of this process (the runtime's, here)."""
    found = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            found += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]"
    return found


@pytest.mark.asyncio
async def test_fork_copies_the_workspace_and_keeps_the_source(sandbox: ConformanceHarness) -> None:
    runtime = sandbox.runtime()
    spec, info = await sandbox.started(runtime)
    await sandbox.write(info, spec, "notes/kept.txt", "from the source\n")
    child_spec = sandbox.spec()
    forked = await runtime.fork(info.state, child_spec)
    sandbox.states.append(forked.state)
    assert forked.status == "created"
    child = await sandbox.ready(runtime, (await runtime.start(forked.state)).state)
    assert await sandbox.read(child, child_spec, "notes/kept.txt") == "from the source\n"
    await sandbox.write(child, child_spec, "notes/kept.txt", "changed in the fork\n")
    assert await sandbox.read(info, spec, "notes/kept.txt") == "from the source\n"
    assert (await runtime.inspect(info.state)).running, "the source stopped"
    uids = [
        json.loads((sandbox.data_dir / "nodes" / n / MARK_FILE).read_text())["uid"]
        for n in (spec.node_id, child_spec.node_id)
    ]
    assert uids[0] != uids[1], "the fork shares its source's host uid"


@pytest.mark.asyncio
async def test_preflight_says_which_limits_nodes_go_without(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without writable cgroup v1 controllers (a cgroup v2 host, say) the sandbox still starts,
    and its start-up log says what its nodes lack."""
    if SANDBOX.unavailable():
        pytest.skip(f"tier sandbox: {SANDBOX.unavailable()}")
    empty = tmp_path / "no-cgroups"
    empty.mkdir()
    config = {**SANDBOX.runtime_config, "cgroup_root": str(empty)}
    runtime = Tier("sandbox", runtime_config=config).make_runtime(tmp_path / "data", "m")
    with caplog.at_level("WARNING", logger="toolserver.runtimes.sandbox"):
        await runtime.preflight()
    (line,) = [r.getMessage() for r in caplog.records if "cgroup" in r.getMessage()]
    assert "memory, pids, cpu, freezer" in line and "a memory limit" in line and "pause" in line

    caplog.clear()
    with caplog.at_level("WARNING", logger="toolserver.runtimes.sandbox"):
        await SANDBOX.make_runtime(tmp_path / "data2", "m").preflight()
    assert not [r for r in caplog.records if "cgroup" in r.getMessage()], "warned on a machine with cgroups"


@pytest.mark.asyncio
async def test_preflight_refuses_without_bubblewrap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap, setpriv, ... on this PATH
    runtime = SANDBOX.make_runtime(tmp_path / "data", "m")
    with pytest.raises(ConfigError) as refused:
        await runtime.preflight()
    message = str(refused.value)
    assert "bwrap" in message and "isolation: docker" in message, message


def test_manager_refuses_to_start_without_bubblewrap(tmp_path: Path) -> None:
    manager = ManagerProcess(tmp_path, **SANDBOX.manager_config())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sh").symlink_to(str(shutil.which("sh")))  # no bwrap, setpriv, ... on this PATH
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOOLSERVER_")}
    done = subprocess.run(
        [sys.executable, "-m", "toolserver", "manager", "--config", str(manager.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "PATH": str(bin_dir)},
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "bwrap" in done.stderr and "isolation: docker" in done.stderr, done.stderr[-2000:]


# ---- trust: what the runtimes read back --------------------------------------------------------------


@pytest_asyncio.fixture(params=[PROCESS.param(), SANDBOX.param()])
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ConformanceHarness]:
    harness = await _harness(request.param, tmp_path)
    try:
        yield harness
    finally:
        await harness.aclose()


@pytest.mark.asyncio
async def test_a_planted_mark_names_no_pid_or_directory_acted_on(
    harness: ConformanceHarness, tmp_path: Path
) -> None:
    """A node (or anyone) rewriting its mark to name a victim process and a directory outside the
    data directory gets neither killed nor deleted: the directory comes from the node id, and a pid
    counts only with the node's own mark (and cgroup)."""
    victim = await asyncio.create_subprocess_exec("sleep", "300")
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "file").write_text("keep me")
    try:
        runtime = harness.runtime()
        spec, info = await harness.started(runtime)
        node_dir = harness.data_dir / "nodes" / spec.node_id
        mark = json.loads((node_dir / MARK_FILE).read_text())
        mark.update(pid=victim.pid, create_time=psutil.Process(victim.pid).create_time(), dir=str(outside))
        (node_dir / MARK_FILE).write_text(json.dumps(mark))
        planted_state = {**info.state, "dir": str(outside), "pid": victim.pid}
        await runtime.list(harness.manager_id)
        await runtime.stop(info.state, grace=0)
        with contextlib.suppress(Exception):  # may refuse; must not touch the victim either way
            await runtime.remove(planted_state)
        await asyncio.sleep(0.2)
        alive = victim.returncode is None and psutil.Process(victim.pid).status() != psutil.STATUS_ZOMBIE
        assert alive, "the runtime killed a process a planted mark named"
        assert (outside / "file").read_text() == "keep me", (
            "the runtime deleted a directory a planted mark named"
        )
        assert not node_dir.exists(), "the node's own directory is still there"
        with pytest.raises(NodeNotFound):
            await runtime.inspect({"dir": str(outside)})
    finally:
        victim.kill()
        await victim.wait()


@pytest.mark.asyncio
async def test_the_node_cannot_write_the_runtimes_marks(sandbox: ConformanceHarness) -> None:
    runtime = sandbox.runtime()
    assert isinstance(runtime, SandboxRuntime)
    spec, info = await sandbox.started(runtime)
    node_dir = sandbox.data_dir / "nodes" / spec.node_id
    out = await sandbox.tool(
        info, spec, SHELL, command=f"ls {node_dir} 2>&1; echo x > ../{MARK_FILE} 2>&1; ls /state ..; id -u"
    )
    text = json.dumps(out)
    assert "secret" not in text and "node.sock" not in text, text
    mark = json.loads((node_dir / MARK_FILE).read_text())
    assert mark["node_id"] == spec.node_id and mark["uid"] >= 1000
    assert (node_dir / "disk" / "workspace").stat().st_uid == mark["uid"]
    assert node_dir.stat().st_mode & 0o077 == 0, "the node directory is open to other users"
