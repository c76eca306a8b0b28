"""docker-compose.yml as a user runs it: the manager in a container starts node containers beside it.

The deployment requires API keys; the test makes one with ``docker compose exec manager toolserver
keys create``, as the README says.

The test talks only to the manager's port published on 127.0.0.1; the manager reaches its nodes on
the compose network the test creates (address_mode network), and no node port is published.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import NODE_IMAGE, docker_containers, docker_unavailable_reason, free_port, wait_until
from toolserver.client import ToolServerClient
from toolserver.errors import ClientError
from toolserver.runtimes.base import LABEL_MANAGER
from toolserver.testing import http_ok

REPO = Path(__file__).resolve().parents[2]
PULLABLE_BASE = "python:3.11-slim-bookworm"
DEBIAN_BASE = "toolserver-base:bookworm"

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def _compose_command() -> list[str] | None:
    """``docker compose`` (v2) or ``docker-compose`` (v1, Debian's package), whichever is here."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def _image_exists(image: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode == 0


@pytest.fixture
def deployment() -> Iterator[tuple[str, str, str]]:
    """A compose project of its own (project, network, volume and port); ``down -v`` afterwards."""
    if reason := docker_unavailable_reason():
        pytest.skip(reason)
    compose = _compose_command()
    if compose is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed; run: make docker-ready")
    if not (REPO / "build" / "wheels" / "app").is_dir():
        pytest.skip("build/wheels is missing; run: make node-image")
    tag = secrets.token_hex(4)
    manager_id = f"compose-test-{tag}"
    port = free_port()
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "COMPOSE_PROJECT_NAME": f"tstest{tag}",
        "TOOLSERVER_PUBLISH_PORT": str(port),
        "TOOLSERVER_MANAGER_ID": manager_id,
        "TOOLSERVER_NETWORK": f"tstest-{tag}-nodes",
        "TOOLSERVER_VOLUME": f"tstest-{tag}-data",
        "NODE_IMAGE": NODE_IMAGE,
        "MANAGER_IMAGE": f"toolserver-manager:{NODE_IMAGE.rpartition(':')[2] or 'latest'}",
        "BASE_IMAGE": PULLABLE_BASE if _image_exists(PULLABLE_BASE) else DEBIAN_BASE,
    }

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*compose, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )

    up = run("up", "-d", "--build", "manager", timeout=600)
    try:
        assert up.returncode == 0, f"compose up failed:\n{up.stdout}\n{up.stderr}"
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until(lambda: http_ok(url + "/alive"), timeout=60, what="the manager container")
        except AssertionError:
            logs = run("logs", "manager")
            raise AssertionError(f"manager not answering:\n{logs.stdout}\n{logs.stderr}") from None
        key = run("exec", "-T", "manager", "toolserver", "keys", "create", "compose-test", "--scope", "admin")
        assert key.returncode == 0, f"keys create failed:\n{key.stdout}\n{key.stderr}"
        yield url, manager_id, key.stdout.strip()
    finally:
        down = run("down", "-v", "--timeout", "30")
        assert down.returncode == 0, f"compose down failed:\n{down.stdout}\n{down.stderr}"


def test_compose_deployment_serves_sessions_in_node_containers(deployment: tuple[str, str, str]) -> None:
    url, manager_id, key = deployment
    label = f"{LABEL_MANAGER}={manager_id}"
    with ToolServerClient(url) as anonymous, pytest.raises(ClientError) as refused:
        anonymous.get_cookie()
    assert refused.value.status_code == 401  # the deployment needs keys
    with ToolServerClient(url, api_key=key) as client, client.session() as session:
        answer = session.execute_tool("shell_command_executor", {"command": "id -u; echo kept > note.txt"})
        assert answer["data"]["output"].split()[0] == "10001"  # the node runs unprivileged
        assert "note.txt" in json.dumps(session.get_workspace_structure())
        [node] = docker_containers(label)
        assert node["state"] == "running"
        inspected = json.loads(
            subprocess.run(
                ["docker", "inspect", node["id"]], capture_output=True, text=True, check=True
            ).stdout
        )[0]
        # nodes are reached on the compose network only: nothing published on the host
        assert not any(inspected["NetworkSettings"]["Ports"].values())
        assert not any(m.get("Source") == "/var/run/docker.sock" for m in inspected["Mounts"])
    # the session's release removed its container
    assert docker_containers(label) == []
