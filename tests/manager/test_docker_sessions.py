"""The manager with the Docker runtime: sessions end to end, tools running inside hardened containers."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator

import pytest
import requests

from tests.support import (
    ManagerProcess,
    docker_containers,
    docker_unavailable_reason,
    docker_volumes,
    remove_docker_networks,
    wait_until,
)
from toolserver.client import ToolServerClient, unwrap
from toolserver.errors import ClientError
from toolserver.runtimes.base import LABEL_MANAGER
from toolserver.testing.tiers import DOCKER

pytestmark = pytest.mark.docker

WRITE = "FileSystemEnv_write_to_file"
READ = "FileSystemEnv_read_from_file"
SHELL = "shell_command_executor"
TICK = 0.5


@pytest.fixture
def docker_manager(manager_factory: Callable[..., ManagerProcess]) -> Iterator[ManagerProcess]:
    reason = docker_unavailable_reason()
    if reason:
        pytest.skip(reason)
    manager = manager_factory(
        **DOCKER.manager_config(), node={"health_check_interval": TICK, "creation_wait_seconds": 60}
    )
    label = f"{LABEL_MANAGER}={manager.config['manager_id']}"
    yield manager
    manager.stop()
    leftovers = docker_containers(label), docker_volumes(label)
    for row in leftovers[0]:
        subprocess.run(["docker", "rm", "-f", row["id"]], capture_output=True)
    for volume in leftovers[1]:
        subprocess.run(["docker", "volume", "rm", "-f", volume], capture_output=True)
    remove_docker_networks(label)
    assert leftovers == ([], []), "containers or volumes left behind"


def _containers(manager: ManagerProcess) -> list[dict[str, str]]:
    return docker_containers(f"{LABEL_MANAGER}={manager.config['manager_id']}")


def test_session_lifecycle_in_a_container(docker_manager: ManagerProcess) -> None:
    manager = docker_manager
    with ToolServerClient(manager.url) as client, client.session() as session:
        record = manager.node(session.node_id)
        assert record["status"] == "running" and record["health"] == "healthy"
        assert record["ip"] == "127.0.0.1"  # reached only through a port published on loopback
        [container] = _containers(manager)
        assert container["name"] == f"toolserver-node-{record['short_id']}"

        out = unwrap(session.execute_tool(SHELL, {"command": "id -u; hostname; pwd"}))
        uid, hostname, cwd = out["output"].split()[:3]
        assert uid != "0"  # the node runs as a non-root user
        assert container["id"].startswith(hostname)  # the tool ran inside the container
        assert cwd == "/workspace"

        session.execute_tool(WRITE, {"filepath": "kept.txt", "content": "survives restarts"})
        subprocess.run(["docker", "kill", container["id"]], check=True, capture_output=True)
        wait_until(
            lambda: manager.node(session.node_id)["status"] == "exited",
            timeout=TICK + 1.0,
            what="exited within one tick",
        )
        with pytest.raises(ClientError) as err:
            session.execute_tool(READ, {"filepath": "kept.txt"})
        assert err.value.status_code == 503
        session.reconnect()
        assert "survives restarts" in str(session.execute_tool(READ, {"filepath": "kept.txt"}))
    wait_until(lambda: _containers(manager) == [], timeout=10, what="container removed on release")
    assert manager.nodes() == []


def test_orphans_and_vanished_containers(docker_manager: ManagerProcess) -> None:
    manager = docker_manager
    label = f"{LABEL_MANAGER}={manager.config['manager_id']}"
    with ToolServerClient(manager.url) as client:
        orphan = client.get_cookie()
        gone = client.get_cookie()
        gone_short = manager.node(gone.node_id)["short_id"]
        subprocess.run(
            ["docker", "rm", "-f", "-v", f"toolserver-node-{gone_short}"], check=True, capture_output=True
        )
        wait_until(lambda: manager.node(gone.node_id) is None, timeout=10, what="record deleted")
        # and what the vanished container left behind (its workspace volume) goes too
        wait_until(
            lambda: f"toolserver-node-{gone_short}-workspace" not in docker_volumes(label),
            timeout=10,
            what="volume removed",
        )
        orphan_short = manager.node(orphan.node_id)["short_id"]
        manager.query("DELETE FROM toolserver_nodes WHERE id = ?", orphan.node_id)
        wait_until(
            lambda: all(orphan_short not in c["name"] for c in _containers(manager)),
            timeout=10,
            what="orphan container removed",
        )
    assert _containers(manager) == []


def test_docker_unreachable_answers_503_and_the_manager_serves_on(
    manager_factory: Callable[..., ManagerProcess],
) -> None:
    # the Engine's address given where XAgent's manager.yml puts Docker's keys
    manager = manager_factory(
        runtime="docker",
        node={"docker_url": "unix:///nonexistent/docker.sock", "health_check_interval": TICK},
    )
    r = requests.post(manager.url + "/get_cookie", timeout=60)
    assert r.status_code == 503
    assert "unavailable" in r.json()["detail"].lower()
    assert requests.get(manager.url + "/alive", timeout=5).json() == "alive"
    assert manager.nodes() == []
