"""The Swarm stack file and the settings it relies on: every TOOLSERVER_* variable of its manager
service is a setting the manager accepts, and the database password comes from the secret file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from toolserver.errors import ConfigError
from toolserver.manager.settings import load_settings

STACK = Path(__file__).resolve().parents[2] / "docker" / "stack" / "stack.yml"


def test_the_stack_runs_replicas_a_database_and_a_load_balancer() -> None:
    stack = yaml.safe_load(STACK.read_text())
    assert set(stack["services"]) == {"manager", "postgres", "lb"}
    manager = stack["services"]["manager"]
    assert manager["deploy"]["update_config"]["parallelism"] == 1
    assert "toolserver_db_password" in manager["secrets"]


def test_names_resolve_to_tasks_and_the_lb_asks_again() -> None:
    """Virtual IPs need IPVS, which this machine's kernel lacks (deployed, the managers got "No route
    to host" to postgres and nginx would not start): DNS round robin, resolved at request time."""
    services = yaml.safe_load(STACK.read_text())["services"]
    assert services["manager"]["deploy"]["endpoint_mode"] == "dnsrr"
    assert services["postgres"]["deploy"]["endpoint_mode"] == "dnsrr"
    conf = (STACK.parent / "nginx.conf").read_text()
    directives = [line.split("#")[0].strip() for line in conf.splitlines()]
    assert "resolver 127.0.0.11 valid=2s ipv6=off;" in directives
    assert "proxy_pass http://$managers:8080;" in directives
    assert not any(line.startswith("upstream") for line in directives)


def test_the_managers_environment_is_accepted_and_the_password_read_from_the_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = yaml.safe_load(STACK.read_text())["services"]["manager"]["environment"]
    secret = tmp_path / "toolserver_db_password"
    secret.write_text("s3cr3t/pw\n")
    env["TOOLSERVER_DATABASE_PASSWORD_FILE"] = str(secret)
    env["TOOLSERVER_MANAGER_ID"] = "swarm-manager-1"  # what Swarm makes of {{.Task.Slot}}
    env["TOOLSERVER_RUNTIME_CONFIG__IMAGE"] = "toolserver-node:latest"
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    settings = load_settings(None)
    assert settings.isolation == "swarm" and settings.node.on_shutdown == "keep"
    assert settings.database_url == "postgresql+asyncpg://toolserver:s3cr3t%2Fpw@postgres:5432/toolserver"


def test_a_missing_or_empty_password_file_stops_the_manager_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"database_password_file .*nope.* cannot be read"):
        load_settings(None, database_password_file=str(tmp_path / "nope"))
    (tmp_path / "empty").write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        load_settings(None, database_password_file=str(tmp_path / "empty"))
