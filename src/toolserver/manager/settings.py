"""Manager configuration: a YAML file plus ``TOOLSERVER_*`` environment overrides.

Accepts the keys of XAgent's manager.yml with their meaning, and ToolServer's own. Every model
forbids unknown keys, so a typo stops the manager with a message naming the key.
Environment overrides use ``__`` between levels: ``TOOLSERVER_NODE__MAX_NODES=20``.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import SettingsConfigDict

from toolserver import __version__
from toolserver.config import EnvOverYamlSettings, describe_validation_error, read_yaml_mapping
from toolserver.errors import ConfigError
from toolserver.protocol import DEFAULT_REDIRECT_GET, DEFAULT_REDIRECT_POST


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ResourceLimits(_Strict):
    """Per-node resource limits (Docker runtime)."""

    memory: str | None = Field("1g", description="memory limit, Docker syntax: 512m, 2g")
    cpus: float | None = Field(1.0, gt=0)
    pids_limit: int | None = Field(256, gt=0)


class NodeSettings(_Strict):
    # XAgent's manager.yml keys
    creation_wait_seconds: float = Field(60, gt=0, description="how long /get_cookie waits for a node")
    idling_close_minutes: float = Field(30, gt=0, description="stop a node idle this long")
    health_check: bool = True
    health_check_interval: float = Field(1.0, gt=0, description="seconds between checker ticks")
    port: int = Field(31942, ge=1, le=65535, description="port the node listens on inside its container")
    creation_kwargs: dict[str, Any] = Field(default_factory=dict, description="Docker create options")
    device_requests: list[dict[str, Any]] | None = None
    # ToolServer's own
    idling_release_minutes: float = Field(24 * 60, gt=0, description="release a node stopped this long")
    max_nodes: int = Field(64, ge=1)
    request_timeout_seconds: float = Field(600, gt=0, description="upstream timeout of a forwarded request")
    on_shutdown: Literal["stop", "keep"] = "stop"
    stop_grace_seconds: float = Field(5, ge=0)
    warm_pool_size: int = Field(0, ge=0)
    env: dict[str, str] = Field(default_factory=dict, description="extra environment for every node")
    config: Path | None = Field(None, description="node YAML config handed to every node")
    # Docker runtime
    image: str = "toolserver-node:latest"
    docker_url: str | None = None
    address_mode: Literal["published", "network"] = "published"
    network: str | None = None
    read_only_rootfs: bool = False
    resources: ResourceLimits = Field(default_factory=ResourceLimits)


class McpSettings(_Strict):
    """The manager's MCP endpoint, ``/mcp`` (Streamable HTTP; one node per MCP session)."""

    enabled: bool = True
    session_idle_minutes: float = Field(
        30, gt=0, description="end an MCP session, and release its node, after this long without requests"
    )
    json_response: bool = Field(
        True,
        description="answer each request with one JSON body (faster) rather than a server-sent-event "
        "stream, which progress notifications need",
    )
    resource_max_bytes: int = Field(
        10 * 1024 * 1024, ge=1, description="largest workspace file served as an MCP resource"
    )
    allowed_hosts: list[str] | None = Field(
        None,
        description="Host headers /mcp accepts (DNS-rebinding protection); default: the loopback names "
        "while the manager listens on loopback, else any",
    )
    allowed_origins: list[str] | None = Field(
        None, description="Origin headers /mcp accepts from browsers; default as for allowed_hosts"
    )


class RedirectPaths(_Strict):
    post: list[str] = Field(default_factory=lambda: list(DEFAULT_REDIRECT_POST))
    get: list[str] = Field(default_factory=lambda: list(DEFAULT_REDIRECT_GET))


class Settings(EnvOverYamlSettings):
    model_config = SettingsConfigDict(
        env_prefix="TOOLSERVER_", env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    version: str = __version__
    builtin_monitor: bool = True
    runtime: Literal["process", "docker"] = "process"
    database_url: str = "sqlite+aiosqlite:///data/toolserver.db"
    data_dir: Path = Path("data")
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    manager_id: str = ""
    max_header_bytes: int = Field(16 * 1024, ge=1024)
    node: NodeSettings = Field(default_factory=NodeSettings)
    mcp: McpSettings = Field(default_factory=McpSettings)
    redirect_to_node_path: RedirectPaths = Field(default_factory=RedirectPaths)

    @model_validator(mode="after")
    def _default_manager_id(self) -> Settings:
        if not self.manager_id:
            object.__setattr__(self, "manager_id", f"{socket.gethostname()}-{self.port}")
        return self


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Read ``path`` (YAML), apply environment and ``overrides``; raise ConfigError naming the bad key."""
    data = read_yaml_mapping(path) if path is not None else {}
    data = _deep_merge(data, overrides)
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None
    # explicit overrides win over the environment too
    for key, value in overrides.items():
        if not isinstance(value, dict):
            setattr(settings, key, value)
    return settings
