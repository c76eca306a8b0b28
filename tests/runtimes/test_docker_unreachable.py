"""A DockerRuntime whose Engine cannot be reached (no Docker needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from toolserver.errors import RuntimeUnavailable
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
