"""Fixtures of the Docker runtime tests.

Docker tests skip (with the reason) when the Engine does not answer or the node image is missing;
``make docker-ready`` provides both. Everything a test creates carries a per-test manager id and
the label ``toolserver.test=<session>``; finalizers remove it by label (containers, volumes,
networks): each test's by its manager id, then the session's, then any killed session's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiodocker
import pytest
from aiodocker.exceptions import DockerError

from toolserver.runtimes import validate_config
from toolserver.runtimes.base import LABEL_MANAGER, ResourceLimits, RuntimeContext
from toolserver.runtimes.docker import DockerRuntime
from toolserver.testing.tiers import node_image

TEST_LABEL = "toolserver.test"
#: The value of TEST_LABEL on what this pytest session makes (other sessions may run at once).
SESSION = f"session-{uuid.uuid4().hex[:8]}"
#: Test objects older than this are leftovers of a killed session, whoever made them.
STALE_SECONDS = 2 * 3600
IMAGE = node_image()


def _docker_url() -> str:
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


async def _probe() -> str | None:
    """Why Docker tests cannot run here, or None."""
    try:
        docker = aiodocker.Docker(url=_docker_url())
    except (ValueError, AssertionError) as exc:
        return f"no Docker Engine address: {exc}"
    try:
        async with asyncio.timeout(10):
            await docker.version()
            try:
                await docker.images.inspect(IMAGE)
            except DockerError:
                return f"node image {IMAGE} is missing (run: make node-image)"
    except (DockerError, TimeoutError) as exc:
        return f"Docker Engine unreachable at {_docker_url()} ({exc}); run: make docker-ready"
    finally:
        await docker.close()
    return None


@pytest.fixture(scope="session")
def docker_available() -> None:
    reason = asyncio.run(_probe())
    if reason:
        pytest.skip(reason)


async def remove_labelled(docker: aiodocker.Docker, label: str, older_than: float | None = None) -> None:
    """Remove every container, volume and network carrying ``label`` (key or key=value); with
    ``older_than``, only those created more than that many seconds ago."""
    filters = {"label": [label]}

    def old(created: object) -> bool:
        if older_than is None:
            return True
        if isinstance(created, int | float):
            stamp = float(created)
        else:  # RFC 3339 text; seconds are enough
            stamp = datetime.fromisoformat(str(created)[:19]).replace(tzinfo=UTC).timestamp()
        return time.time() - stamp > older_than

    for container in await docker.containers.list(all=True, filters=filters):
        if old(container["Created"]):
            with contextlib.suppress(DockerError):
                await container.delete(force=True, v=True)
    volumes = (await docker.volumes.list(filters=filters)).get("Volumes") or []
    for vol in volumes:
        if old(vol.get("CreatedAt", "1970-01-01T00:00:00")):
            with contextlib.suppress(DockerError):
                await aiodocker.docker.DockerVolume(docker, vol["Name"]).delete()
    for net in await docker.networks.list(filters=filters):
        if old(net.get("Created", "1970-01-01T00:00:00")):
            with contextlib.suppress(DockerError):
                await aiodocker.docker.DockerNetwork(docker, net["Id"]).delete()


@pytest.fixture(scope="session", autouse=True)
def _sweep_test_objects() -> Any:
    """After the session, nothing of this session is left, nor leftovers of killed sessions."""
    yield

    async def sweep() -> None:
        with contextlib.suppress(Exception):
            async with aiodocker.Docker(url=_docker_url()) as docker, asyncio.timeout(60):
                await remove_labelled(docker, f"{TEST_LABEL}={SESSION}")
                await remove_labelled(docker, TEST_LABEL, older_than=STALE_SECONDS)

    if os.path.exists(_docker_url().removeprefix("unix://")) or not _docker_url().startswith("unix://"):
        asyncio.run(sweep())


@pytest.fixture
async def docker(docker_available: None) -> AsyncIterator[aiodocker.Docker]:
    client = aiodocker.Docker(url=_docker_url())
    yield client
    await client.close()


@pytest.fixture
def manager_id() -> str:
    return f"pytest-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def make_runtime(
    docker: aiodocker.Docker, manager_id: str, tmp_path: Path
) -> AsyncIterator[Callable[..., DockerRuntime]]:
    """``make_runtime(resources=..., **docker_keys)`` → a DockerRuntime for this test's manager id
    (the keys of DockerConfig, and the shared node.resources limits)."""
    made: list[DockerRuntime] = []

    def make(resources: dict[str, Any] | None = None, **keys: Any) -> DockerRuntime:
        kwargs = dict(keys.pop("creation_kwargs", {}))
        kwargs["labels"] = {**kwargs.get("labels", {}), TEST_LABEL: SESSION}
        keys.setdefault("image", IMAGE)
        config = validate_config("docker", {**keys, "creation_kwargs": kwargs})
        context = RuntimeContext(tmp_path, manager_id, resources=ResourceLimits(**(resources or {})))
        runtime = DockerRuntime(config, context)
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        await runtime.aclose()
    await remove_labelled(docker, f"{LABEL_MANAGER}={manager_id}")


async def wait_for(
    check: Callable[[], Any], limit: float = 30.0, interval: float = 0.05, what: str = "condition"
) -> Any:
    """Poll the coroutine function ``check`` until it returns a truthy value."""
    deadline = time.monotonic() + limit
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit}s waiting for {what}")
        await asyncio.sleep(interval)


async def exec_in(
    docker: aiodocker.Docker, container_id: str, cmd: list[str], limit: float = 60.0, user: str = ""
) -> tuple[int, str]:
    """Run ``cmd`` in the container (like docker exec); return (exit code, output)."""
    container = docker.containers.container(container_id)
    execution = await container.exec(cmd, user=user)
    chunks: list[bytes] = []
    async with asyncio.timeout(limit):
        async with execution.start(detach=False) as stream:
            while (msg := await stream.read_out()) is not None:
                chunks.append(msg.data)
        while (info := await execution.inspect())["Running"]:
            await asyncio.sleep(0.05)
    return int(info["ExitCode"]), b"".join(chunks).decode(errors="replace")
