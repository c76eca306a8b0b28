"""The swarm runtime: its service spec carries the Docker tier's hardening, its config refuses what a
service cannot express, and a manager on it serves and removes sessions on a real swarm."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest

from tests.support import ManagerProcess, wait_until
from toolserver.errors import ConfigError
from toolserver.runtimes.base import LABEL_MANAGER, LABEL_NODE, NodeSpec, ResourceLimits, RuntimeContext
from toolserver.runtimes.registry import validate_config
from toolserver.runtimes.swarm import SwarmRuntime
from toolserver.testing.tiers import SWARM, node_image


def _runtime(tmp_path: Path, **config: object) -> SwarmRuntime:
    cfg = validate_config("swarm", {"image": "toolserver-node:x", **config})
    context = RuntimeContext(
        data_dir=tmp_path, manager_id="m1", resources=ResourceLimits(memory="512m", cpus=0.5, pids_limit=99)
    )
    runtime = SwarmRuntime(cfg, context)  # type: ignore[arg-type]
    assert isinstance(runtime, SwarmRuntime)
    return runtime


def test_a_nodes_service_is_hardened_limited_labelled_and_placed_as_configured(tmp_path: Path) -> None:
    runtime = _runtime(
        tmp_path,
        constraints=["node.labels.tools==yes"],
        placement_preferences=["node.labels.zone"],
        volume_driver="local",
        volume_options={"type": "nfs", "o": "addr=10.0.0.1", "device": ":/exports"},
        creation_kwargs={"environment": ["A=1"], "cap_add": ["NET_BIND_SERVICE"]},
    )
    spec = runtime.service_spec(NodeSpec("abc123", "m1", "s3cret"), "sha256:feed")
    task = spec["TaskTemplate"]
    container = task["ContainerSpec"]
    assert container["Image"] == "sha256:feed"  # by id: no engine looks for a registry
    assert container["User"] == "10001:10001" and container["Init"] is True
    assert container["CapabilityDrop"] == ["ALL"] and container["CapabilityAdd"] == ["NET_BIND_SERVICE"]
    assert "A=1" in container["Env"] and "TOOLSERVER_NODE_SECRET=s3cret" in container["Env"]
    assert container["HealthCheck"] == {"Test": ["NONE"]}
    assert task["Resources"]["Limits"] == {"MemoryBytes": 512 * 1024**2, "NanoCPUs": 500_000_000, "Pids": 99}
    assert task["RestartPolicy"] == {"Condition": "none"}
    assert task["Placement"] == {
        "Constraints": ["node.labels.tools==yes"],
        "Preferences": [{"Spread": {"SpreadDescriptor": "node.labels.zone"}}],
    }
    for labels in (spec["Labels"], container["Labels"]):
        assert labels[LABEL_MANAGER] == "m1" and labels[LABEL_NODE] == "abc123"
    (workspace,) = [m for m in container["Mounts"] if m["Target"] == "/workspace"]
    assert workspace["Source"] == "toolserver-node-abc123-workspace"
    assert workspace["VolumeOptions"]["DriverConfig"] == {
        "Name": "local",
        "Options": {"type": "nfs", "o": "addr=10.0.0.1", "device": ":/exports"},
    }
    (port,) = spec["EndpointSpec"]["Ports"]
    assert port["PublishMode"] == "host" and "PublishedPort" not in port
    assert spec["Mode"] == {"Replicated": {"Replicas": 0}}  # created, not started


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"privileged": True}, "never runs privileged"),
        ({"devices": ["/dev/fuse"]}, "cannot map devices"),
        ({"security_opt": ["seccomp=unconfined"]}, "no security options"),
        ({"volumes": ["/var/run/docker.sock:/s"]}, "Docker socket"),
    ],
)
def test_config_refuses_what_a_service_cannot_or_must_not_do(kwargs: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=words) as err:
        validate_config("swarm", {"creation_kwargs": kwargs})
    assert "runtime_config.creation_kwargs" in str(err.value)


@pytest.mark.docker
@pytest.mark.swarm
def test_a_manager_on_the_swarm_serves_a_session_and_release_removes_its_service(tmp_path: Path) -> None:
    reason = SWARM.unavailable()
    if reason:
        pytest.skip(reason)
    with ManagerProcess(tmp_path / "m", isolation="swarm", runtime_config={"image": node_image()}) as m:
        r = httpx.post(m.url + "/get_cookie", timeout=120)
        assert r.status_code == 200, r.text + m.tail()
        headers = {"Cookie": f"node_id={r.cookies['node_id']}"}
        body = {"tool_name": "calculator", "arguments": {"expression": "6*7"}}
        assert httpx.post(m.url + "/execute_tool", json=body, headers=headers, timeout=60).json() == 42
        label = f"label={LABEL_MANAGER}={m.manager_id}"

        def services() -> list[str]:
            cmd = ["docker", "service", "ls", "-q", "--filter", label]
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.split()

        assert len(services()) == 1
        assert httpx.post(m.url + "/release_session", headers=headers, timeout=60).status_code == 200
        assert services() == []
        volumes = ["docker", "volume", "ls", "-q", "--filter", label]
        wait_until(
            lambda: not subprocess.run(volumes, capture_output=True, text=True, timeout=30).stdout.strip(),
            timeout=20,
            what="the workspace volume removed",
        )
