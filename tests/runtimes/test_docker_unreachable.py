"""A DockerRuntime whose Engine cannot be reached (no Docker needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiodocker.exceptions import DockerError

from toolserver.errors import RuntimeBackendError, RuntimeUnavailable
from toolserver.runtimes.base import NodeSpec, RuntimeContext
from toolserver.runtimes.docker import DockerConfig, DockerRuntime

URL = "unix:///nonexistent.sock"


async def test_unreachable_engine_raises_runtime_unavailable() -> None:
    rt = DockerRuntime(DockerConfig(docker_url=URL), RuntimeContext(Path("data"), "m-unreachable"))
    spec = NodeSpec(node_id="n1", manager_id="m-unreachable", secret="s")
    calls = [
        rt.list("m-unreachable"),
        rt.create(spec),
        rt.start({"container_id": "x"}),
        rt.stop({"container_id": "x"}),
        rt.kill({"container_id": "x"}),
        rt.remove({"container_id": "x", "volume": "v"}),
        rt.inspect({"container_id": "x"}),
    ]
    for call in calls:
        with pytest.raises(
            RuntimeUnavailable, match=r"Docker Engine unreachable at unix:///nonexistent\.sock"
        ):
            await call
    await rt.aclose()


async def test_bad_engine_address_is_runtime_unavailable() -> None:
    rt = DockerRuntime(DockerConfig(docker_url="gopher://nowhere"), RuntimeContext(Path("data"), "m"))
    with pytest.raises(RuntimeUnavailable, match="gopher://nowhere"):
        await rt.list("m")


@pytest.mark.parametrize(
    ("status", "message", "unavailable"),
    [
        (500, "failed to create shim task: daemon is shutting down", True),
        (500, 'connection error: desc = "transport: error while dialing: containerd.sock"', True),
        (503, "Service Unavailable", True),
        (500, "invalid reference format", False),
        (409, "Conflict. The container name is already in use", False),
    ],
)
async def test_engine_errors_of_a_daemon_going_down_are_runtime_unavailable(
    status: int, message: str, unavailable: bool
) -> None:
    rt = DockerRuntime(DockerConfig(docker_url=URL), RuntimeContext(Path("data"), "m"))

    async def fails(_: object) -> None:
        raise DockerError(status, message)

    expected = RuntimeUnavailable if unavailable else RuntimeBackendError
    with pytest.raises(expected) as caught:
        await rt._api("create", fails)
    assert isinstance(caught.value, RuntimeUnavailable) == unavailable
    await rt.aclose()
