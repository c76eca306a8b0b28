"""Docker runtime without a Docker Engine: config translation, hardening defaults, state parsing."""

from __future__ import annotations

from typing import Any

import pytest

from toolserver.errors import ConfigError, RuntimeBackendError
from toolserver.manager.settings import Settings
from toolserver.protocol import SECRET_ENV
from toolserver.runtimes.base import LABEL_MANAGER, LABEL_NODE, NodeSpec
from toolserver.runtimes.docker_config import NodeTemplate, parse_size, translate_creation_kwargs
from toolserver.runtimes.docker_state import (
    exit_code_from_status_text,
    from_inspect,
    from_list_entry,
    health_from_status_text,
)

SPEC = NodeSpec(node_id="abc123", manager_id="m1", secret="s3cret", env={"A": "1"})


def template(**node: Any) -> NodeTemplate:
    """The template of Docker settings given where XAgent's manager.yml puts them (under node)."""
    settings = Settings(manager_id="m1", isolation="docker", node=node)
    return NodeTemplate.from_config(settings.runtime_config, settings.runtime_context())


def body(**node: Any) -> dict[str, Any]:
    return template(**node).container_body(SPEC)


def test_defaults_are_hardened() -> None:
    b = body()
    host = b["HostConfig"]
    assert host["Privileged"] is False
    assert host["CapDrop"] == ["ALL"]
    assert "no-new-privileges:true" in host["SecurityOpt"]
    assert host["Memory"] == 1024**3 and host["MemorySwap"] == 1024**3
    assert host["NanoCpus"] == 1_000_000_000
    assert host["PidsLimit"] == 256
    assert host["Init"] is True
    assert host["ReadonlyRootfs"] is False
    assert b["User"] == "10001:10001"
    assert host["PortBindings"] == {"31942/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]}
    assert host["Binds"] == ["toolserver-node-abc123-workspace:/workspace:rw"]
    assert b["Labels"][LABEL_MANAGER] == "m1" and b["Labels"][LABEL_NODE] == "abc123"
    assert f"{SECRET_ENV}=s3cret" in b["Env"] and "A=1" in b["Env"]
    assert "Cmd" not in b  # the image's ENTRYPOINT runs the node


def test_other_node_port_gets_its_own_healthcheck() -> None:
    b = body(port=8000)
    assert b["Cmd"] == ["--port", "8000"]
    assert b["ExposedPorts"] == {"8000/tcp": {}}
    assert "http://127.0.0.1:8000/health" in b["Healthcheck"]["Test"][-1]
    assert b["Healthcheck"]["Interval"] == 30 * 10**9
    assert "Healthcheck" not in body()  # the image's own


def test_read_only_rootfs_gets_tmpfs_and_network_none_publishes_nothing() -> None:
    b = body(read_only_rootfs=True, network="none")
    host = b["HostConfig"]
    assert host["ReadonlyRootfs"] is True
    assert set(host["Tmpfs"]) == {"/tmp", "/home/toolserver"}
    assert host["NetworkMode"] == "none"
    assert "PortBindings" not in host and "ExposedPorts" not in b


def test_xagent_creation_kwargs_are_translated() -> None:
    b = body(
        creation_kwargs={
            "image": "my/node:1",
            "detach": True,
            "network": "tool-server-network",
            "environment": ["X=1", "Y=2"],
            "volumes": {"cache": {"bind": "/cache", "mode": "ro"}},
            "healthcheck": {"test": "true", "interval": 10**9, "retries": 3},
            "mem_limit": "256m",
            "cap_add": ["NET_BIND_SERVICE"],
        },
        device_requests=[{"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}],
        address_mode="network",
    )
    host = b["HostConfig"]
    assert b["Image"] == "my/node:1"
    assert host["NetworkMode"] == "tool-server-network"
    assert b["NetworkingConfig"] == {"EndpointsConfig": {"tool-server-network": {}}}
    assert "PortBindings" not in host
    assert "X=1" in b["Env"] and "Y=2" in b["Env"]
    assert "cache:/cache:ro" in host["Binds"]
    assert b["Healthcheck"] == {"Test": ["CMD-SHELL", "true"], "Interval": 10**9, "Retries": 3}
    assert host["Memory"] == host["MemorySwap"] == 256 * 1024**2
    assert host["CapAdd"] == ["NET_BIND_SERVICE"] and host["CapDrop"] == ["ALL"]
    assert host["DeviceRequests"] == [{"Driver": "nvidia", "Count": -1, "Capabilities": [["gpu"]]}]


@pytest.mark.parametrize(
    "volumes",
    [
        ["/var/run/docker.sock:/var/run/docker.sock"],
        {"/run/docker.sock": {"bind": "/d.sock", "mode": "ro"}},
        ["/var/run:/host-run"],
        ["/:/host"],
        ["/srv/x/docker.sock:/x"],
    ],
)
def test_docker_socket_is_never_mounted(volumes: Any) -> None:
    with pytest.raises(ConfigError, match="Docker socket"):
        body(creation_kwargs={"volumes": volumes})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"privileged": True}, "never runs privileged"),
        ({"security_opt": ["seccomp=unconfined"]}, "turn off a protection"),
        ({"security_opt": ["no-new-privileges:false"]}, "turn off a protection"),
        ({"cap_add": ["SYS_ADMIN"]}, "not granted"),
        ({"network_mode": "host"}, "another network namespace"),
        ({"pid_mode": "host"}, "process namespace"),
        ({"ports": {"31942/tcp": 80}}, "publishes the node port"),
        ({"bogus": 1}, "unknown key 'runtime_config.creation_kwargs.bogus'"),
        ({"mem_limit": "lots"}, "not a size"),
    ],
)
def test_bad_creation_kwargs_name_the_key(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        translate_creation_kwargs(kwargs, {"/var/run/docker.sock"})


def test_bad_node_id_is_refused() -> None:
    with pytest.raises(RuntimeBackendError):
        template().container_body(NodeSpec(node_id="../x", manager_id="m1", secret="s"))


def test_parse_size() -> None:
    assert parse_size("512m", "k") == 512 * 1024**2
    assert parse_size("2g", "k") == 2 * 1024**3
    assert parse_size("1.5G", "k") == int(1.5 * 1024**3)
    assert parse_size(1000, "k") == 1000
    assert parse_size("128mb", "k") == 128 * 1024**2


@pytest.mark.parametrize(
    ("text", "health", "code"),
    [
        ("Up 3 seconds (health: starting)", "starting", None),
        ("Up 2 minutes (healthy)", "healthy", None),
        ("Up 5 hours (unhealthy)", "unhealthy", None),
        ("Up 1 second", "Unknown", None),
        ("Exited (137) 2 seconds ago", "Unknown", 137),
        ("Exited (0) About a minute ago", "Unknown", 0),
        ("Created", "Unknown", None),
    ],
)
def test_status_text(text: str, health: str, code: int | None) -> None:
    assert health_from_status_text(text) == health
    assert exit_code_from_status_text(text) == code


LABELS = {LABEL_MANAGER: "m1", LABEL_NODE: "n1", "toolserver.volume": "vol-n1"}


def test_list_entry_running_published() -> None:
    entry = {
        "Id": "c1",
        "Names": ["/toolserver-node-n1"],
        "State": "running",
        "Status": "Up 4 seconds (healthy)",
        "Labels": LABELS,
        "Ports": [{"IP": "127.0.0.1", "PrivatePort": 31942, "PublicPort": 49153, "Type": "tcp"}],
    }
    info = from_list_entry(entry, address_mode="published", network=None, port=31942)
    assert (info.status, info.health, info.host, info.port) == ("running", "healthy", "127.0.0.1", 49153)
    assert info.state == {
        "container_id": "c1",
        "container": "toolserver-node-n1",
        "volume": "vol-n1",
        "node_id": "n1",
        "manager_id": "m1",
    }
    assert info.detail is None


def test_list_entry_exited_and_network_mode() -> None:
    entry = {
        "Id": "c1",
        "Names": ["/toolserver-node-n1"],
        "State": "exited",
        "Status": "Exited (137) 1 second ago",
        "Labels": LABELS,
        "NetworkSettings": {"Networks": {"nodes": {"IPAddress": ""}}},
    }
    info = from_list_entry(entry, address_mode="network", network="nodes", port=31942)
    assert info.status == "exited" and info.health == "unhealthy"
    assert info.detail is not None and "exit code 137" in info.detail
    assert (info.host, info.port) == ("toolserver-node-n1", 31942)


def test_inspect_reports_oom() -> None:
    data = {
        "Id": "c1",
        "Name": "/toolserver-node-n1",
        "Config": {"Labels": LABELS},
        "State": {"Status": "exited", "ExitCode": 137, "OOMKilled": True, "Health": {"Status": "healthy"}},
        "NetworkSettings": {"Ports": {}, "Networks": {"nodes": {"IPAddress": "10.9.0.2"}}},
    }
    info = from_inspect(data, address_mode="published", network=None, port=31942)
    assert info.status == "exited" and info.health == "unhealthy" and info.port == 0
    assert info.detail is not None and "OOMKilled" in info.detail and "137" in info.detail
    net = from_inspect(
        {**data, "State": {"Status": "running", "Health": {"Status": "starting"}}},
        address_mode="network",
        network="nodes",
        port=31942,
    )
    assert (net.host, net.port, net.health, net.detail) == ("10.9.0.2", 31942, "starting", None)
