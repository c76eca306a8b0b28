"""Measure the Docker runtime (not a test): cold start, list() with many nodes, healthcheck CPU.

    .venv/bin/python -m tests.runtimes.measure_docker [--starts 10] [--nodes 20] [--health-interval S]

Needs a Docker Engine and the node image (make docker-ready). Nodes are reached on 127.0.0.1 only;
everything made carries a fresh manager id and is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import aiodocker
import httpx
import psutil

from tests.runtimes.conftest import SESSION, TEST_LABEL, remove_labelled
from toolserver.manager.settings import Settings
from toolserver.runtimes.base import LABEL_MANAGER, NodeSpec
from toolserver.runtimes.docker import DockerRuntime


def runtime(manager_id: str, **node: Any) -> DockerRuntime:
    kwargs = dict(node.pop("creation_kwargs", {}))
    kwargs["labels"] = {TEST_LABEL: SESSION}
    return DockerRuntime(Settings(manager_id=manager_id, node={**node, "creation_kwargs": kwargs}))


def spec(manager_id: str) -> NodeSpec:
    return NodeSpec(node_id=f"m{uuid.uuid4().hex[:8]}", manager_id=manager_id, secret=uuid.uuid4().hex)


async def cold_start(
    rt: DockerRuntime, docker: aiodocker.Docker, manager_id: str
) -> tuple[float, float, float, float]:
    """Seconds from create to: running; first GET /health 200 on the published port; the runtime
    reporting healthy (what the manager waits for); Docker's own State.Health.Status healthy."""
    async with httpx.AsyncClient(trust_env=False, timeout=1) as http:
        t0 = time.perf_counter()
        info = await rt.start((await rt.create(spec(manager_id))).state)
        running = time.perf_counter() - t0
        container = docker.containers.container(info.state["container_id"])
        first_200 = healthy = docker_healthy = 0.0
        while not (first_200 and healthy and docker_healthy):
            if not first_200:
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"http://127.0.0.1:{info.port}/health")).status_code == 200:
                        first_200 = time.perf_counter() - t0
            if not healthy and (await rt.inspect(info.state)).health == "healthy":
                healthy = time.perf_counter() - t0
            if not docker_healthy and (await container.show())["State"]["Health"]["Status"] == "healthy":
                docker_healthy = time.perf_counter() - t0
            await asyncio.sleep(0.02)
            if time.perf_counter() - t0 > 120:
                raise RuntimeError("node not healthy after 120 s")
        await rt.remove(info.state)
        return running, first_200, healthy, docker_healthy


_ENGINE = ("dockerd", "containerd", "containerd-shim", "containerd-shim-runc-v2", "runc")


def _engine_cpu() -> float:
    """CPU seconds used so far by the Engine's processes and the children they waited for (runc)."""
    total = 0.0
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] in _ENGINE:
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
    return total


def _containers_cpu(ids: list[str]) -> float:
    """CPU seconds used so far inside the containers (cgroup v1 cpuacct, cgroupfs driver)."""
    total = 0
    for cid in ids:
        with contextlib.suppress(OSError, ValueError):
            total += int(Path(f"/sys/fs/cgroup/cpuacct/docker/{cid}/cpuacct.usage").read_text())
    return total / 1e9


async def node_overhead(seconds: float, ids: list[str]) -> tuple[float, float]:
    """Cores used by the Engine and by the (idle) containers over ``seconds``."""
    engine, inside, t0 = _engine_cpu(), _containers_cpu(ids), time.perf_counter()
    await asyncio.sleep(seconds)
    elapsed = time.perf_counter() - t0
    return (_engine_cpu() - engine) / elapsed, (_containers_cpu(ids) - inside) / elapsed


async def time_list(rt: DockerRuntime, manager_id: str, nodes: int, what: str) -> None:
    durations = []
    for _ in range(20):
        t0 = time.perf_counter()
        listed = await rt.list(manager_id)
        durations.append(time.perf_counter() - t0)
    assert len(listed) == nodes
    print(
        f"list() with {len(listed)} running containers ({what}):"
        f" median {statistics.median(durations) * 1000:.1f} ms  max {max(durations) * 1000:.1f} ms (20 calls)"
    )


async def wait_docker_healthy(docker: aiodocker.Docker, ids: list[str]) -> None:
    for cid in ids:
        while (await docker.containers.container(cid).show())["State"]["Health"]["Status"] != "healthy":
            await asyncio.sleep(0.5)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--starts", type=int, default=10)
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--cpu-seconds", type=float, help="CPU window (default: two healthcheck intervals)")
    parser.add_argument("--health-interval", type=float, help="override the image's 30 s (seconds); 0: none")
    args = parser.parse_args()
    manager_id = f"measure-{uuid.uuid4().hex[:8]}"
    node: dict[str, Any] = {}
    if args.health_interval == 0:
        node["creation_kwargs"] = {"healthcheck": {"test": ["NONE"]}}
    elif args.health_interval:
        probe = "import urllib.request as r; r.urlopen('http://127.0.0.1:31942/health', timeout=2)"
        node["creation_kwargs"] = {
            "healthcheck": {
                "test": ["CMD", "python3", "-I", "-S", "-c", probe],
                "interval": int(args.health_interval * 1e9),
                "timeout": 3 * 10**9,
                "start_period": 60 * 10**9,
                "retries": 3,
            }
        }
    interval = 30 if args.health_interval is None else args.health_interval
    rt = runtime(manager_id, **node)
    docker = aiodocker.Docker()
    try:
        print(f"Docker Engine {(await rt.ping())['Version']}")
        samples = [await cold_start(rt, docker, manager_id) for _ in range(args.starts if interval else 0)]
        steps = ("running", "first /health 200", "runtime says healthy", "Docker says healthy")
        for i, name in enumerate(steps if samples else ()):
            values = [s[i] for s in samples]
            print(
                f"create+start -> {name:21s} median {statistics.median(values):.3f}s"
                f"  min {min(values):.3f}s  max {max(values):.3f}s  (n={len(values)})"
            )
        infos = await asyncio.gather(*(rt.create(spec(manager_id)) for _ in range(args.nodes)))
        await asyncio.gather(*(rt.start(i.state) for i in infos))
        async with httpx.AsyncClient(trust_env=False, timeout=1) as http:
            for info in await rt.list(manager_id):  # every node answers (also without a healthcheck)
                while True:
                    with contextlib.suppress(httpx.HTTPError):
                        if (await http.get(f"http://127.0.0.1:{info.port}/health")).status_code == 200:
                            break
                    await asyncio.sleep(0.2)
        await asyncio.sleep(2)  # let the boot CPU settle
        await time_list(rt, manager_id, args.nodes, "Docker says starting: each one also gets GET /health")
        window = args.cpu_seconds or max(20.0, 2 * interval)
        engine, inside = await node_overhead(window, [i.state["container_id"] for i in infos])
        what = f"healthcheck every {interval:g} s" if interval else "no healthcheck"
        print(
            f"{args.nodes} idle nodes, {what}, over {window:g} s: Engine {engine:.3f} cores,"
            f" inside the containers {inside:.3f} cores"
        )
        if interval:
            await wait_docker_healthy(docker, [i.state["container_id"] for i in infos])
            await time_list(rt, manager_id, args.nodes, "Docker says healthy: one Docker call only")
    finally:
        await remove_labelled(docker, f"{LABEL_MANAGER}={manager_id}")
        await docker.close()
        await rt.aclose()


if __name__ == "__main__":
    asyncio.run(main())
