"""The isolation tiers a test suite runs against: one list, with the manager config that selects
each tier and the reason a tier cannot run on this machine.

Suites that must hold on every tier (the runtime conformance suite, and the escape and fault
suites after it) parametrise over :func:`tier_params`; a tier this machine cannot run is skipped
with its reason, never dropped silently::

    @pytest.fixture(params=tier_params())
    def tier(request) -> Tier:
        return request.param

    def test_something(tier: Tier, tmp_path: Path) -> None:
        with ManagerProcess(tmp_path, **tier.manager_config()) as manager:
            ...

The Docker and gVisor tiers use the node image named by ``$TOOLSERVER_NODE__IMAGE`` (default
``toolserver-node:latest``), so that each developer's and CI's own build is the one tested.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import subprocess
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from toolserver.runtimes.base import LABEL_MANAGER, LABEL_NODE, NodeInfo, Runtime, RuntimeContext
from toolserver.runtimes.process import MARK_ENV
from toolserver.runtimes.registry import create_runtime, validate_config

__all__ = [
    "DOCKER",
    "GVISOR",
    "IMAGE_ENV",
    "PROCESS",
    "SANDBOX",
    "SWARM",
    "Tier",
    "docker_unavailable_reason",
    "gvisor_unavailable_reason",
    "marked_processes",
    "node_image",
    "sandbox_unavailable_reason",
    "tier_params",
    "tiers",
]

#: Environment variable naming the node image the Docker tier runs (tests, CI, ``make bench``).
IMAGE_ENV = "TOOLSERVER_NODE__IMAGE"
DEFAULT_IMAGE = "toolserver-node:latest"

Leftovers = Callable[[Runtime, NodeInfo], Awaitable[list[str]]]


async def _nothing_known(runtime: Runtime, info: NodeInfo) -> list[str]:
    return []


@dataclass(frozen=True)
class Tier:
    """One isolation tier under test.

    ``runtime_config`` is the mapping the manager's ``runtime_config`` gets; ``unavailable``
    returns why the tier cannot run here (None: it can); ``leftovers`` lists what the backend
    still holds of a removed node (processes, directories, containers, volumes); ``marks`` are
    pytest marker names its tests carry (``docker``).
    """

    name: str
    runtime_config: Mapping[str, Any] = field(default_factory=dict)
    unavailable: Callable[[], str | None] = lambda: None
    leftovers: Leftovers = _nothing_known
    marks: tuple[str, ...] = ()

    def manager_config(self) -> dict[str, Any]:
        """Manager settings (as in manager.yml) that select this tier."""
        return {"isolation": self.name, "runtime_config": dict(self.runtime_config)}

    def make_runtime(self, data_dir: Path, manager_id: str, **context: Any) -> Runtime:
        """A runtime of this tier, as the manager would make it; ``context`` overrides the
        other :class:`RuntimeContext` fields (``stop_grace_seconds``, ``resources``, ...)."""
        config = validate_config(self.name, self.runtime_config)
        return create_runtime(config, RuntimeContext(data_dir=data_dir, manager_id=manager_id, **context))

    def param(self) -> Any:
        """This tier as a ``pytest.param``: its id, its marks, and a skip with the reason when it
        cannot run here."""
        import pytest

        marks = [getattr(pytest.mark, mark) for mark in self.marks]
        reason = self.unavailable()
        if reason:
            marks.append(pytest.mark.skip(reason=f"tier {self.name}: {reason}"))
        return pytest.param(self, id=self.name, marks=marks)


def node_image() -> str:
    """The node image the Docker tier runs."""
    return os.environ.get(IMAGE_ENV) or DEFAULT_IMAGE


@functools.cache
def docker_unavailable_reason(image: str | None = None) -> str | None:
    """Why Docker nodes cannot run here (no Engine, no node image), or None. Asked once per image."""
    image = image or node_image()
    try:
        if subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode != 0:
            return "Docker Engine unreachable; run: make docker-ready"
        if subprocess.run(["docker", "image", "inspect", image], capture_output=True, timeout=20).returncode:
            return f"node image {image} is missing; run: make node-image"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"docker CLI unusable: {exc}"
    return None


@functools.cache
def gvisor_unavailable_reason(image: str | None = None) -> str | None:
    """Why gVisor nodes cannot run here (Docker's reasons, or no runsc runtime in dockerd), or None."""
    reason = docker_unavailable_reason(image)
    if reason:
        return reason
    try:
        answer = subprocess.run(
            ["docker", "info", "--format", "{{json .Runtimes}}"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"docker CLI unusable: {exc}"
    if '"runsc"' not in answer.stdout:
        return "dockerd has no runsc runtime; run: scripts/ensure-docker.sh (installs and registers runsc)"
    return None


def marked_processes(node_id: str) -> list[psutil.Process]:
    """Live processes carrying the process runtime's mark of node ``node_id``."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(MARK_ENV) == node_id and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


async def _process_leftovers(runtime: Runtime, info: NodeInfo) -> list[str]:
    def scan() -> list[str]:
        left = [f"process {p.pid} of node {info.node_id}" for p in marked_processes(info.node_id)]
        node_dir = Path(str(info.state.get("dir", "")))
        if info.state.get("dir") and node_dir.exists():
            left.append(f"directory {node_dir}")
        return left

    return await asyncio.to_thread(scan)


async def _docker_leftovers(runtime: Runtime, info: NodeInfo) -> list[str]:
    import aiodocker

    url = getattr(runtime, "url", None) or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    filters = {"label": [f"{LABEL_MANAGER}={info.manager_id}", f"{LABEL_NODE}={info.node_id}"]}
    async with aiodocker.Docker(url=url) as docker:
        containers = await docker.containers.list(all=True, filters=filters)
        volumes = (await docker.volumes.list(filters=filters)).get("Volumes") or []
    return [f"container {c.id[:12]}" for c in containers] + [f"volume {v['Name']}" for v in volumes]


@functools.cache
def sandbox_unavailable_reason() -> str | None:
    """Why sandboxed nodes cannot run here (not root, no bwrap, no user namespaces), or None."""
    from toolserver.runtimes.sandbox import missing_requirements
    from toolserver.runtimes.sandbox_config import SandboxConfig

    return missing_requirements(SandboxConfig())


async def _sandbox_leftovers(runtime: Runtime, info: NodeInfo) -> list[str]:
    from toolserver.runtimes.sandbox import SandboxRuntime, socket_path
    from toolserver.runtimes.sandbox_limits import CONTROLLERS

    assert isinstance(runtime, SandboxRuntime)
    cgroup = runtime._cgroup(info.node_id)
    node_dir = runtime.root / info.node_id

    def scan() -> list[str]:
        left = [f"process {pid} of node {info.node_id}" for pid in cgroup.pids()]
        left += [f"cgroup {cgroup.path(c)}" for c in CONTROLLERS if cgroup.path(c).exists()]
        left += [f"directory {p}" for p in (node_dir, socket_path(node_dir)) if p.exists()]
        claims = [c for c in runtime.claims.dir.glob("*") if c.read_text() == str(node_dir)]
        left += [f"uid claim {c}" for c in claims]
        with open("/proc/self/mounts") as mounts:
            left += [f"mount {line.split()[1]}" for line in mounts if str(node_dir) in line]
        return left

    return await asyncio.to_thread(scan)


def swarm_unavailable_reason() -> str | None:
    """Why Swarm nodes cannot run here (not a swarm manager, no Docker, no node image), or None.

    Not cached: a test session's fixture may put the engine in swarm mode after collection
    (:class:`toolserver.testing.swarm.SwarmMode`)."""
    from toolserver.testing.swarm import swarm_state

    reason = docker_unavailable_reason()
    if reason:
        return reason
    state = swarm_state()
    if state is None or state[0] != "active" or not state[1]:
        word = state[0] if state else "unknown"
        return (
            f"the Docker Engine is not a swarm manager (swarm state {word}); run "
            "'docker swarm init --advertise-addr 127.0.0.1', or let the test session do it"
        )
    return None


async def _swarm_leftovers(runtime: Runtime, info: NodeInfo) -> list[str]:
    import aiodocker

    url = getattr(runtime, "url", None) or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    filters = {"label": [f"{LABEL_MANAGER}={info.manager_id}", f"{LABEL_NODE}={info.node_id}"]}
    async with aiodocker.Docker(url=url) as docker:
        services = await docker.services.list(filters=filters)
    return [f"service {s['Spec']['Name']}" for s in services] + await _docker_leftovers(runtime, info)


PROCESS = Tier("process", leftovers=_process_leftovers)
SANDBOX = Tier("sandbox", unavailable=sandbox_unavailable_reason, leftovers=_sandbox_leftovers)
DOCKER = Tier(
    "docker",
    runtime_config={"image": node_image()},
    unavailable=docker_unavailable_reason,
    leftovers=_docker_leftovers,
    marks=("docker",),
)

GVISOR = Tier(
    "gvisor",
    runtime_config={"image": node_image()},
    unavailable=gvisor_unavailable_reason,
    leftovers=_docker_leftovers,
    marks=("docker",),
)


SWARM = Tier(
    "swarm",
    runtime_config={"image": node_image()},
    unavailable=swarm_unavailable_reason,
    leftovers=_swarm_leftovers,
    marks=("docker", "swarm"),
)


def tiers() -> list[Tier]:
    """Every tier ToolServer offers, whether or not this machine can run it."""
    return [SANDBOX, PROCESS, DOCKER, GVISOR, SWARM]


def tier_params() -> list[Any]:
    """:func:`tiers` as pytest params (skipped with the reason where a tier cannot run)."""
    return [tier.param() for tier in tiers()]
