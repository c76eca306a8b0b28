"""An MCP session whose node is a hardened Docker container: the same tools, the container gone after."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator

import anyio
import pytest
from mcp import Client

from tests.support import (
    ManagerProcess,
    docker_containers,
    docker_unavailable_reason,
    docker_volumes,
    remove_docker_networks,
    wait_until,
)
from toolserver.runtimes.base import LABEL_MANAGER
from toolserver.testing.tiers import DOCKER

pytestmark = pytest.mark.docker


@pytest.fixture
def docker_manager(manager_factory: Callable[..., ManagerProcess]) -> Iterator[ManagerProcess]:
    reason = docker_unavailable_reason()
    if reason:
        pytest.skip(reason)
    manager = manager_factory(**DOCKER.manager_config(), node={"creation_wait_seconds": 60})
    yield manager
    manager.stop()
    label = f"{LABEL_MANAGER}={manager.config['manager_id']}"
    for row in docker_containers(label):
        subprocess.run(["docker", "rm", "-f", row["id"]], capture_output=True)
    for volume in docker_volumes(label):
        subprocess.run(["docker", "volume", "rm", "-f", volume], capture_output=True)
    remove_docker_networks(label)


async def test_mcp_session_in_a_container(docker_manager: ManagerProcess) -> None:
    label = f"{LABEL_MANAGER}={docker_manager.config['manager_id']}"
    async with Client(docker_manager.url + "/mcp") as client:
        (container,) = docker_containers(label)
        assert container["name"].startswith("toolserver-node-")
        result = await client.call_tool("shell_command_executor", {"command": "id -u > uid.txt; cat uid.txt"})
        assert result.structured_content["output"].strip() == "10001"  # the node image's user
        (contents,) = (await client.read_resource("workspace:///uid.txt")).contents
        assert contents.text.strip() == "10001"
    gone = lambda: not docker_containers(label) and not docker_volumes(label)  # noqa: E731
    await anyio.to_thread.run_sync(lambda: wait_until(gone, timeout=60, what="container and volume removed"))
