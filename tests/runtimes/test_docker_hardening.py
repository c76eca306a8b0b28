"""The sandbox of a Docker node, asserted through docker inspect and by abusing a live node."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from pathlib import Path

import aiodocker
import pytest

from toolserver.runtimes.base import NodeInfo, NodeSpec
from toolserver.runtimes.docker import DockerRuntime

from .conftest import exec_in, wait_for
from .test_docker_runtime import health_200

pytestmark = pytest.mark.docker

MakeRuntime = Callable[..., DockerRuntime]


def spec(manager_id: str) -> NodeSpec:
    return NodeSpec(node_id=f"h{uuid.uuid4().hex[:8]}", manager_id=manager_id, secret=uuid.uuid4().hex)


async def started_healthy(rt: DockerRuntime, manager_id: str) -> NodeInfo:
    info = await rt.start((await rt.create(spec(manager_id))).state)

    async def healthy() -> NodeInfo | None:
        current = await rt.inspect(info.state)
        assert current.status == "running", current
        return current if current.health == "healthy" else None

    return await wait_for(healthy, what="a healthy node")


async def test_hardening_flags(make_runtime: MakeRuntime, manager_id: str, docker: aiodocker.Docker) -> None:
    rt = make_runtime(resources={"memory": "512m", "cpus": 0.5, "pids_limit": 100})
    info = await rt.start((await rt.create(spec(manager_id))).state)
    raw = await docker.containers.container(info.state["container_id"]).show()
    host = raw["HostConfig"]
    assert host["Privileged"] is False
    assert host["CapDrop"] == ["ALL"] and not host.get("CapAdd")
    assert any(opt.startswith("no-new-privileges") for opt in host["SecurityOpt"])
    assert host["Memory"] == 512 * 1024**2
    assert host["NanoCpus"] == 500_000_000
    assert host["PidsLimit"] == 100
    assert host["ReadonlyRootfs"] is False
    assert host["Init"] is True
    assert raw["Config"]["User"] not in ("", "root", "0", "0:0")
    mounts = [m.get("Source", "") for m in raw["Mounts"]] + list(host.get("Binds") or [])
    assert not [m for m in mounts if "docker.sock" in m]
    assert all(b["HostIp"] == "127.0.0.1" for b in host["PortBindings"]["31942/tcp"])
    assert all(b["HostIp"] == "127.0.0.1" for b in raw["NetworkSettings"]["Ports"]["31942/tcp"])
    # the node process itself: non-root, no capabilities, no way to gain privileges
    code, out = await exec_in(docker, info.state["container_id"], ["sh", "-c", "id -u; cat /proc/1/status"])
    assert code == 0
    uid, status = out.split("\n", 1)
    assert int(uid) != 0
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapBnd"], 16) == 0
    assert fields["NoNewPrivs"].strip() == "1"


async def test_read_only_rootfs(make_runtime: MakeRuntime, manager_id: str, docker: aiodocker.Docker) -> None:
    rt = make_runtime(read_only_rootfs=True)
    info = await started_healthy(rt, manager_id)
    cid = info.state["container_id"]
    raw = await docker.containers.container(cid).show()
    assert raw["HostConfig"]["ReadonlyRootfs"] is True
    assert (await exec_in(docker, cid, ["touch", "/opt/toolserver/x"]))[0] != 0
    for path in ("/workspace/x", "/tmp/x", "/home/toolserver/x"):
        assert (await exec_in(docker, cid, ["touch", path]))[0] == 0, path
    assert await health_200(info)


async def test_network_none(make_runtime: MakeRuntime, manager_id: str, docker: aiodocker.Docker) -> None:
    rt = make_runtime(network="none")
    info = await rt.start((await rt.create(spec(manager_id))).state)
    raw = await docker.containers.container(info.state["container_id"]).show()
    assert raw["HostConfig"]["NetworkMode"] == "none"
    assert info.status == "running" and info.port == 0  # unreachable by design
    code, out = await exec_in(docker, info.state["container_id"], ["cat", "/proc/net/dev"])
    assert code == 0 and [ln for ln in out.splitlines() if ":" in ln and "lo:" not in ln] == []


def _pids_files(cid: str) -> list[Path]:
    """Where the host keeps the container's pids.current (cgroup v1 / v2, cgroupfs / systemd)."""
    root = Path("/sys/fs/cgroup")
    return [
        root / "pids" / "docker" / cid / "pids.current",
        root / "pids" / "system.slice" / f"docker-{cid}.scope" / "pids.current",
        root / "system.slice" / f"docker-{cid}.scope" / "pids.current",
        root / "docker" / cid / "pids.current",
    ]


def _fork_refusals(cid: str) -> int | None:
    """How many forks the pids limit refused (pids.events ``max``), when the host shows it."""
    for path in _pids_files(cid):
        with contextlib.suppress(OSError, ValueError):
            events = dict(line.split() for line in path.with_name("pids.events").read_text().splitlines())
            return int(events["max"])
    return None


async def pids(docker: aiodocker.Docker, cid: str) -> int:
    """The container's task count: from the host's cgroup file when readable (fast), else stats."""
    for path in _pids_files(cid):
        with contextlib.suppress(OSError, ValueError):
            return int(path.read_text())
    stats = await docker.containers.container(cid).stats(stream=False)  # about 1 s per call
    return int(stats[0]["pids_stats"].get("current", 0))


async def test_fork_bomb_is_contained_by_the_pids_limit(
    make_runtime: MakeRuntime, manager_id: str, docker: aiodocker.Docker
) -> None:
    limit = 64
    rt = make_runtime(resources={"memory": "512m", "cpus": 1.0, "pids_limit": limit})
    info = await started_healthy(rt, manager_id)
    cid = info.state["container_id"]
    baseline = await pids(docker, cid)
    # The classic bash fork bomb, for 5 s: `timeout` then SIGKILLs its whole process group (the bomb
    # never leaves it). The SECONDS guard (inherited by every copy) stops it should anything escape.
    bomb = ":(){ [ $SECONDS -lt 20 ] && { :|:& }; }; :; exec sleep 60"
    task = asyncio.create_task(exec_in(docker, cid, ["timeout", "-s", "KILL", "5", "bash", "-c", bomb]))
    samples: list[int] = []
    while not task.done():
        await asyncio.sleep(0.1)
        samples.append(await pids(docker, cid))
    await task
    during = sorted(samples)[len(samples) // 2]
    assert limit - 8 <= during <= limit, f"median {during} tasks with pids_limit {limit}"
    # `docker exec` (e.g. the healthcheck's probe) joins the cgroup by migration, which pids.max does
    # not stop, so short peaks can pass the limit by a runc process and its threads.
    assert max(samples) <= limit + 16, f"peak {max(samples)} tasks with pids_limit {limit}"
    refused = _fork_refusals(cid)
    assert refused is None or refused > 0, "the kernel never refused a fork"
    # the host is fine: it still forks
    proc = await asyncio.create_subprocess_exec("true")
    assert await asyncio.wait_for(proc.wait(), 10) == 0

    async def calmed_down() -> bool:
        return await pids(docker, cid) <= baseline + 2  # what is left was reaped by the init process

    await wait_for(calmed_down, limit=30, interval=0.2, what="the bomb's processes to be gone")
    assert await health_200(info)
    assert (await rt.inspect(info.state)).status == "running"


async def test_memory_limit_kills_the_hog_not_the_node(
    make_runtime: MakeRuntime, manager_id: str, docker: aiodocker.Docker
) -> None:
    rt = make_runtime(resources={"memory": "128m", "cpus": 1.0, "pids_limit": 256})
    info = await started_healthy(rt, manager_id)
    hog = "b = b'x' * (400 << 20); print(len(b))"
    code, _ = await exec_in(docker, info.state["container_id"], ["python3", "-c", hog], limit=60)
    assert code == 137  # SIGKILLed by the kernel's OOM killer: the biggest process in the cgroup
    after = await rt.inspect(info.state)
    assert after.status == "running"
    assert await health_200(after)


async def test_node_over_its_memory_limit_is_reported_oom_killed(
    make_runtime: MakeRuntime, manager_id: str
) -> None:
    hog = ["python3", "-c", "b = b'x' * (400 << 20); import time; time.sleep(60)"]
    rt = make_runtime(resources={"memory": "128m"}, creation_kwargs={"entrypoint": hog})
    info = await rt.start((await rt.create(spec(manager_id))).state)

    async def exited() -> NodeInfo | None:
        current = await rt.inspect(info.state)
        return current if current.status == "exited" else None

    dead = await wait_for(exited, limit=30, what="the node to be OOM-killed")
    assert dead.detail and "OOMKilled" in dead.detail and "137" in dead.detail
    listed = [n for n in await rt.list(manager_id) if n.node_id == info.node_id]
    assert listed[0].status == "exited" and "137" in (listed[0].detail or "")
