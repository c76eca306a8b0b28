"""Configuration: XAgent's manager.yml keys accepted, bad keys and types stop the manager by name."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import ManagerProcess, config_refusal
from toolserver.client import ToolServerClient
from toolserver.errors import ConfigError
from toolserver.manager.settings import load_settings
from toolserver.runtimes.base import NodeSpec
from toolserver.runtimes.docker_config import DockerConfig, NodeTemplate
from toolserver.runtimes.sandbox_config import SandboxConfig
from toolserver.testing import scratch_config

XAGENT_MANAGER_YML = """
version: "0.3"
builtin_monitor: true
node:
  creation_wait_seconds: 60
  idling_close_minutes: 30
  health_check: true
  health_check_interval: 1
  port: 31942
  creation_kwargs:
    image: toolserver-node:latest
    network: tool-server-network
    privileged: false
  device_requests: null
redirect_to_node_path:
  post: [/execute_tool, /upload_file]
  get: [/]
"""


def test_xagent_manager_yml_is_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOOLSERVER_NODE__IMAGE", raising=False)
    path = tmp_path / "manager.yml"
    path.write_text(XAGENT_MANAGER_YML)
    settings = load_settings(path)
    assert settings.version == "0.3"
    assert settings.redirect_to_node_path.post == ["/execute_tool", "/upload_file"]
    assert settings.isolation == settings.runtime == "sandbox"  # the default tier
    assert settings.runtime_config == SandboxConfig()
    # the sandbox runtime has no use for Docker's keys, as the process one before; the manager says so
    assert settings.ignored_keys == ("node.creation_kwargs", "node.port")
    assert settings.database_url.startswith("sqlite+aiosqlite:///")
    assert settings.host == "127.0.0.1"


def test_xagent_docker_keys_keep_their_meaning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """XAgent's node.creation_kwargs / node.port / node.device_requests reach the Docker runtime."""
    monkeypatch.delenv("TOOLSERVER_NODE__IMAGE", raising=False)
    path = tmp_path / "manager.yml"
    path.write_text(XAGENT_MANAGER_YML.replace("port: 31942", "port: 8000") + "runtime: docker\n")
    settings = load_settings(path)
    assert settings.isolation == "docker" and settings.ignored_keys == ()
    config = settings.runtime_config
    assert isinstance(config, DockerConfig)
    assert config.port == 8000 and config.creation_kwargs["network"] == "tool-server-network"
    body = NodeTemplate.from_config(config, settings.runtime_context()).container_body(
        NodeSpec("n1", settings.manager_id, "secret")
    )
    assert body["Image"] == "toolserver-node:latest"
    assert body["HostConfig"]["NetworkMode"] == "tool-server-network"
    assert body["Cmd"] == ["--port", "8000"]


def test_docker_keys_in_runtime_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOOLSERVER_NODE__IMAGE", raising=False)
    path = tmp_path / "manager.yml"
    path.write_text(
        "isolation: docker\n"
        "runtime_config:\n  image: my/node:2\n  read_only_rootfs: true\n"
        "node:\n  resources: {memory: 512m, pids_limit: 64}\n  stop_grace_seconds: 3\n"
    )
    settings = load_settings(path)
    assert settings.runtime_config == DockerConfig(image="my/node:2", read_only_rootfs=True)
    context = settings.runtime_context()  # limits stay shared by every tier
    assert (context.resources.memory, context.resources.pids_limit) == ("512m", 64)
    assert context.stop_grace_seconds == 3 and context.manager_id == settings.manager_id


def test_runtime_is_the_former_name_of_isolation() -> None:
    assert load_settings(None, runtime="docker").isolation == "docker"
    assert load_settings(None, isolation="docker", runtime="docker").runtime == "docker"
    with pytest.raises(
        ConfigError, match=r"'isolation' \('docker'\) and its former name 'runtime' \('process'\)"
    ):
        load_settings(None, isolation="docker", runtime="process")


@pytest.mark.parametrize("variable", ["TOOLSERVER_NODE__IMAGE", "TOOLSERVER_RUNTIME_CONFIG__IMAGE"])
@pytest.mark.parametrize(
    "in_file", ["", "node:\n  image: file/node:1\n", "runtime_config:\n  image: file/node:1\n"]
)
def test_image_from_the_environment_wins_over_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, in_file: str
) -> None:
    """Both the XAgent place and runtime_config, in the environment, override either in the file."""
    monkeypatch.delenv("TOOLSERVER_NODE__IMAGE", raising=False)
    monkeypatch.setenv(variable, "ci/node:branch")
    monkeypatch.setenv("TOOLSERVER_ISOLATION", "docker")
    path = tmp_path / "manager.yml"
    path.write_text(in_file)
    assert load_settings(path).runtime_config.image == "ci/node:branch"


def test_the_same_key_in_both_places_of_a_file_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TOOLSERVER_NODE__IMAGE", raising=False)
    path = tmp_path / "manager.yml"
    path.write_text("isolation: docker\nnode:\n  image: a\nruntime_config:\n  image: b\n")
    with pytest.raises(ConfigError, match=r"'node\.image' and 'runtime_config\.image' differ"):
        load_settings(path)
    path.write_text("isolation: docker\nnode:\n  image: a\nruntime_config:\n  image: a\n")
    assert load_settings(path).runtime_config.image == "a"


def test_environment_overrides_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "manager.yml"
    path.write_text("node:\n  max_nodes: 3\n  idling_close_minutes: 5\n")
    monkeypatch.setenv("TOOLSERVER_NODE__MAX_NODES", "7")
    settings = load_settings(path)
    assert settings.node.max_nodes == 7
    assert settings.node.idling_close_minutes == 5


@pytest.mark.parametrize(
    ("yaml_text", "named"),
    [
        ("node:\n  max_nodez: 3\n", "node.max_nodez"),
        ("runtimee: process\n", "runtimee"),
        ("node:\n  max_nodes: many\n", "node.max_nodes"),
        ("runtime: kubernetes\n", "'runtime': unknown runtime 'kubernetes'; the registered runtimes are "),
        ("isolation: kubernetes\n", "'isolation': unknown runtime 'kubernetes'"),
        ("node:\n  on_shutdown: sometimes\n", "node.on_shutdown"),
        ("isolation: docker\nruntime_config:\n  imagee: x\n", "unknown key 'runtime_config.imagee'"),
        ("isolation: docker\nruntime_config:\n  port: x\n", "'runtime_config.port'"),
        ("isolation: docker\nnode:\n  port: x\n", "'node.port'"),
        ("runtime_config:\n  image: x\n", "unknown key 'runtime_config.image'"),  # not the process runtime's
        (
            "runtime: docker\nnode:\n  creation_kwargs: {bogus: 1}\n",
            "unknown key 'node.creation_kwargs.bogus'",
        ),
        ("isolation: docker\nruntime_config:\n  type: process\n", "'runtime_config.type' is 'process'"),
    ],
)
def test_bad_key_or_type_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, yaml_text: str, named: str
) -> None:
    monkeypatch.delenv("TOOLSERVER_NODE__IMAGE", raising=False)
    path = tmp_path / "manager.yml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_settings(path)


@pytest.mark.parametrize(
    ("yaml_text", "named"),
    [
        ("node:\n  idle_minutes: 3\n", "node.idle_minutes"),
        (
            "isolation: docker\nruntime_config:\n  creation_kwargs: {bogus: 1}\n",
            "runtime_config.creation_kwargs.bogus",
        ),
    ],
)
def test_manager_refuses_to_start_with_unknown_key(tmp_path: Path, yaml_text: str, named: str) -> None:
    path = tmp_path / "manager.yml"
    path.write_text(yaml_text)
    proc = config_refusal(path)
    assert proc.returncode == 2
    assert named in proc.stderr and "Traceback" not in proc.stderr


def test_cli_help_for_each_command() -> None:
    for command in ("manager", "node", "checker"):
        proc = subprocess.run(
            [sys.executable, "-m", "toolserver", command, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert "--" in proc.stdout and command in proc.stdout


def test_manager_with_xagent_docker_keys_serves_on_the_process_runtime(
    manager_factory: Callable[..., ManagerProcess],
) -> None:
    manager = manager_factory(
        isolation="process",
        node={"port": 31942, "creation_kwargs": {"network": "tool-server-network"}, "device_requests": None},
    )
    with ToolServerClient(manager.url) as client, client.session() as session:
        assert "42" in str(session.execute_tool("calculator", {"expression": "6*7"}))
    assert "node.creation_kwargs, node.port: not settings of the process runtime, ignored" in manager.log()


def test_nodes_that_could_need_more_memory_than_the_host_are_named(tmp_path: Path) -> None:
    """64 nodes of 1 GiB on a 24 GiB host: the manager says so at start (it used to go on until
    the host ran out of memory)."""
    from toolserver.manager.server import memory_overcommit

    settings = load_settings(None, **scratch_config(tmp_path))
    said = memory_overcommit(settings, host_bytes=24 << 30)
    assert said is not None and "node.max_nodes (64) x node.resources.memory (1g) is 64.0 GiB" in said
    assert "24.0 GiB" in said
    assert memory_overcommit(settings, host_bytes=64 << 30) is None  # exactly fits
    unlimited = load_settings(None, **scratch_config(tmp_path), node={"resources": {"memory": None}})
    assert memory_overcommit(unlimited, host_bytes=1 << 30) is None
