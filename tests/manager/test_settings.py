"""Configuration: XAgent's manager.yml keys accepted, bad keys and types stop the manager by name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from toolserver.errors import ConfigError
from toolserver.manager.settings import load_settings

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


def test_xagent_manager_yml_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "manager.yml"
    path.write_text(XAGENT_MANAGER_YML)
    settings = load_settings(path)
    assert settings.version == "0.3"
    assert settings.node.creation_kwargs["network"] == "tool-server-network"
    assert settings.redirect_to_node_path.post == ["/execute_tool", "/upload_file"]
    assert settings.runtime == "process"
    assert settings.database_url.startswith("sqlite+aiosqlite:///")
    assert settings.host == "127.0.0.1"


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
        ("runtime: kubernetes\n", "runtime"),
        ("node:\n  on_shutdown: sometimes\n", "node.on_shutdown"),
    ],
)
def test_bad_key_or_type_is_named(tmp_path: Path, yaml_text: str, named: str) -> None:
    path = tmp_path / "manager.yml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_settings(path)


def test_manager_refuses_to_start_with_unknown_key(tmp_path: Path) -> None:
    path = tmp_path / "manager.yml"
    path.write_text("node:\n  idle_minutes: 3\n")
    proc = subprocess.run(
        [sys.executable, "-m", "toolserver", "manager", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "node.idle_minutes" in proc.stderr


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
