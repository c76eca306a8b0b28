"""Manager configuration: a YAML file plus ``TOOLSERVER_*`` environment overrides.

Accepts the keys of XAgent's manager.yml with their meaning, and ToolServer's own. Every model
forbids unknown keys, so a typo stops the manager with a message naming the key.
Environment overrides use ``__`` between levels: ``TOOLSERVER_NODE__MAX_NODES=20``.

``isolation`` names the runtime (``runtime`` is its former name and means the same); the
runtime's own keys sit in ``runtime_config`` and are validated by that runtime's config model
(see :mod:`toolserver.runtimes.registry`) when the settings load. XAgent's file put Docker's keys
under ``node`` (``node.image``, ``node.creation_kwargs``, ...): they are moved into
``runtime_config`` when the chosen runtime has them, and set aside (:attr:`Settings.ignored_keys`)
when it has not, as the process runtime always ignored them.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    SerializeAsAny,
    ValidationError,
    model_validator,
)
from pydantic_settings import SettingsConfigDict

from toolserver import __version__
from toolserver.config import EnvOverYamlSettings, describe_validation_error, read_yaml_mapping
from toolserver.errors import ConfigError
from toolserver.protocol import DEFAULT_REDIRECT_GET, DEFAULT_REDIRECT_POST
from toolserver.runtimes.base import ResourceLimits, RuntimeConfig, RuntimeContext
from toolserver.runtimes.registry import runtime_class, validate_config

DEFAULT_ISOLATION = "sandbox"
#: Keys of XAgent's manager.yml under ``node`` that belong to a runtime (Docker's).
XAGENT_RUNTIME_KEYS = (
    "image",
    "docker_url",
    "address_mode",
    "network",
    "read_only_rootfs",
    "creation_kwargs",
    "device_requests",
    "port",
)

__all__ = ["NodeSettings", "ResourceLimits", "Settings", "load_settings"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class NodeSettings(_Strict):
    # XAgent's manager.yml keys (its Docker keys move to runtime_config, see the module docstring)
    creation_wait_seconds: float = Field(60, gt=0, description="how long /get_cookie waits for a node")
    idling_close_minutes: float = Field(30, gt=0, description="stop a node idle this long")
    health_check: bool = True
    health_check_interval: float = Field(1.0, gt=0, description="seconds between checker ticks")
    health_probe_seconds: float = Field(
        10.0,
        ge=0,
        description="seconds between the checker's /health requests to a healthy node of the process "
        "and sandbox tiers (0: every tick); whether it still runs is seen every tick, and a node not "
        "healthy yet is asked every tick",
    )
    # ToolServer's own
    idling_release_minutes: float = Field(24 * 60, gt=0, description="release a node stopped this long")
    max_nodes: int = Field(64, ge=1)
    request_timeout_seconds: float = Field(600, gt=0, description="upstream timeout of a forwarded request")
    on_shutdown: Literal["stop", "keep"] = "stop"
    stop_grace_seconds: float = Field(5, ge=0)
    warm_pool_size: int = Field(0, ge=0)
    env: dict[str, str] = Field(default_factory=dict, description="extra environment for every node")
    config: Path | None = Field(None, description="node YAML config handed to every node")
    resources: ResourceLimits = Field(default_factory=ResourceLimits)
    idle_action: Literal["stop", "pause"] = Field(
        "stop", description="what an idle node gets: stopped (workspace kept) or paused (memory kept)"
    )


class SessionLimits(_Strict):
    """What a session may ask for in its options (``/get_cookie`` body), and its default lifetime."""

    default_timeout_seconds: float | None = Field(
        None, gt=0, description="lifetime of a session that asks for none (null: until released)"
    )
    max_timeout_seconds: float = Field(
        7 * 24 * 3600, gt=0, description="longest lifetime a session may ask for"
    )
    max_idle_seconds: float = Field(24 * 3600, gt=0, description="longest idle_seconds a session may ask for")
    max_resources: ResourceLimits = Field(
        default_factory=lambda: ResourceLimits(memory="8g", cpus=4.0, pids_limit=4096),
        description="highest resources a session may ask for (null: no maximum)",
    )
    networks: list[str] = Field(
        default_factory=list, description="networks a session may ask to join (Docker network names)"
    )


class EventSettings(_Strict):
    """Where session events go besides the log and the admin API: webhooks."""

    webhooks: list[str] = Field(
        default_factory=list, description="http(s) URLs receiving every session event as a signed JSON POST"
    )
    secret: str | None = Field(
        None, description="shared secret of the X-ToolServer-Signature header (HMAC-SHA256 of the body)"
    )
    timeout_seconds: float = Field(5, gt=0, description="longest wait for one delivery")
    max_attempts: int = Field(12, ge=1, description="deliveries of one event before it is dropped")
    retry_max_seconds: float = Field(30, gt=0, description="longest pause between two attempts")
    queue_size: int = Field(10000, ge=1, description="events waiting per URL; beyond it new ones are dropped")

    @model_validator(mode="after")
    def _signed(self) -> EventSettings:
        for url in self.webhooks:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"events.webhooks: {url!r} is not an http:// or https:// URL")
        if self.webhooks and not self.secret:
            raise ValueError("events.webhooks needs events.secret (the key of their HMAC-SHA256 signature)")
        return self


class Quotas(_Strict):
    """Default quotas of an API key that has none of its own (``null``: no limit)."""

    max_sessions: int | None = Field(16, ge=1, description="live sessions per key")
    starts_per_minute: int | None = Field(60, ge=1, description="new sessions per key per minute")


class RequestLimits(_Strict):
    """What one HTTP request may cost the manager before it is refused (enforced by the server)."""

    header_bytes: int = Field(16 * 1024, ge=1024, description="request line plus headers (431 beyond)")
    headers: int = Field(100, ge=8, description="number of header fields (431 beyond)")
    request_line_bytes: int = Field(8 * 1024, ge=256, description="method, target and version (414 beyond)")
    head_timeout_seconds: float = Field(10, gt=0, description="whole request head, from its first byte")
    idle_timeout_seconds: float = Field(60, gt=0, description="no byte of an unfinished request (408)")
    keep_alive_seconds: float = Field(5, gt=0, description="idle connection between requests")
    body_bytes: int = Field(64 * 1024, ge=1024, description="body of the session and admin routes (413)")


class McpSettings(_Strict):
    """The manager's MCP endpoint, ``/mcp`` (Streamable HTTP; one node per MCP session)."""

    enabled: bool = True
    session_idle_minutes: float = Field(
        30, gt=0, description="end an MCP session, and release its node, after this long without requests"
    )
    json_response: bool = Field(
        True,
        description="answer each request with one JSON body (faster) rather than a server-sent-event "
        "stream, which carries progress notifications (a shell command's output)",
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


class ClusterSettings(_Strict):
    """Replicated managers sharing one database (see README "Running on a cluster")."""

    max_nodes: int | None = Field(
        None, ge=1, description="live nodes of every manager sharing the database together (null: no limit)"
    )
    lease_seconds: float | None = Field(
        None,
        gt=0,
        description="how long a replica's lease lasts after each renewal (every checker tick); "
        "default 2 x node.health_check_interval",
    )
    adopt: bool = Field(True, description="adopt the nodes of replicas whose lease expired")
    lease_retention_hours: float = Field(
        24,
        gt=0,
        description="how long the lease of an adopted replica that never came back is kept before "
        "it is deleted",
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
    isolation: str = Field(DEFAULT_ISOLATION, description="the runtime nodes run in (a registered name)")
    runtime: str | None = Field(None, description="former name of isolation, same meaning")
    runtime_config: SerializeAsAny[RuntimeConfig] = Field(description="the chosen runtime's own keys")
    database_url: str = "sqlite+aiosqlite:///data/toolserver.db"
    database_password_file: Path | None = Field(
        None, description="file holding the database password (a Docker secret), put into database_url"
    )
    database_wait_seconds: float = Field(
        60, ge=0, description="how long a starting manager waits for an unreachable database"
    )
    data_dir: Path = Path("data")
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    manager_id: str = ""
    auth: Literal["none", "api_keys"] = "none"
    allow_unauthenticated_network: bool = False
    key_cache_seconds: float = Field(5, gt=0, le=300, description="how long a checked API key is trusted")
    quotas: Quotas = Field(default_factory=Quotas)
    sessions: SessionLimits = Field(default_factory=SessionLimits)
    events: EventSettings = Field(default_factory=EventSettings)
    limits: RequestLimits = Field(default_factory=RequestLimits)
    metrics_listen: str | None = Field(None, description="host:port serving /metrics without a key")
    log_format: Literal["text", "json"] = "text"
    database_outage_grace_seconds: float = Field(
        60, ge=0, description="while the database is down, serve sessions whose route is known this long"
    )
    node: NodeSettings = Field(default_factory=NodeSettings)
    mcp: McpSettings = Field(default_factory=McpSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    redirect_to_node_path: RedirectPaths = Field(default_factory=RedirectPaths)
    _ignored_keys: tuple[str, ...] = PrivateAttr(())

    @model_validator(mode="wrap")
    @classmethod
    def _runtime_config(cls, data: Any, handler: ModelWrapValidatorHandler[Settings]) -> Settings:
        if not isinstance(data, dict):  # an assignment: the runtime was chosen at load time
            settings = handler(data)
            if not settings.isolation == settings.runtime == settings.runtime_config.type:
                chosen = settings.runtime_config.type
                raise ConfigError(
                    f"isolation is {settings.isolation!r} but runtime_config belongs to {chosen!r}: the "
                    "runtime is chosen when the settings load; load new settings to change it"
                )
            return settings
        data, ignored = _place_runtime_config(data)
        settings = handler(data)
        settings._ignored_keys = ignored
        return settings

    @model_validator(mode="after")
    def _default_manager_id(self) -> Settings:
        if not self.manager_id:
            object.__setattr__(self, "manager_id", f"{socket.gethostname()}-{self.port}")
        return self

    @model_validator(mode="after")
    def _database_password(self) -> Settings:
        if self.database_password_file is not None:
            object.__setattr__(
                self, "database_url", with_password(self.database_url, self.database_password_file)
            )
        return self

    @property
    def lease_seconds(self) -> float:
        """How long this manager's lease lasts after a renewal (``cluster.lease_seconds``)."""
        return self.cluster.lease_seconds or 2 * self.node.health_check_interval

    @model_validator(mode="after")
    def _keys_off_loopback(self) -> Settings:
        if self.auth == "none" and not is_loopback(self.host) and not self.allow_unauthenticated_network:
            raise ValueError(
                f"host {self.host!r} is reachable from the network but auth is 'none': set auth: api_keys "
                "(and create a key with `toolserver keys create`), or set allow_unauthenticated_network: "
                "true to let anyone who reaches the port use the manager"
            )
        if self.metrics_listen is not None:
            metrics_address(self.metrics_listen)
        return self

    @property
    def ignored_keys(self) -> tuple[str, ...]:
        """XAgent-placed keys (``node.port``, ...) that the chosen runtime has no use for."""
        return self._ignored_keys

    def runtime_context(self) -> RuntimeContext:
        """What every runtime gets from the manager besides its own config."""
        return RuntimeContext(
            data_dir=self.data_dir,
            manager_id=self.manager_id,
            node_env=dict(self.node.env),
            node_config=self.node.config,
            resources=self.node.resources,
            stop_grace_seconds=self.node.stop_grace_seconds,
            health_probe_seconds=self.node.health_probe_seconds,
        )


def _isolation(data: dict[str, Any]) -> tuple[str, str]:
    """The chosen runtime's name and the key that chose it."""
    isolation, runtime = data.get("isolation"), data.get("runtime")
    if isolation and runtime and isolation != runtime:
        raise ConfigError(
            f"'isolation' ({isolation!r}) and its former name 'runtime' ({runtime!r}) differ; "
            "set only isolation"
        )
    if isolation:
        return str(isolation), "isolation"
    return (str(runtime), "runtime") if runtime else (DEFAULT_ISOLATION, "isolation")


def _in_environment(*key: str) -> bool:
    """Whether a ``TOOLSERVER_*`` variable sets this key (or one beneath it)."""
    name = "TOOLSERVER_" + "__".join(key).upper()
    return any(k.upper() == name or k.upper().startswith(name + "__") for k in os.environ)


def _wins(old: str) -> bool:
    """Whether ``node.<old>`` wins over a different ``runtime_config.<old>``: the environment
    overrides the file, as everywhere; given at the same level, the two are an error."""
    old_env, new_env = _in_environment("node", old), _in_environment("runtime_config", old)
    if old_env == new_env:
        raise ConfigError(f"'node.{old}' and 'runtime_config.{old}' differ; keep only runtime_config.{old}")
    return old_env


def _place_runtime_config(data: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """``data`` with ``runtime_config`` validated by the chosen runtime's model, XAgent's runtime
    keys moved there from ``node`` (or set aside when the runtime has none of them), and
    ``isolation`` and ``runtime`` both set to the chosen name."""
    name, key = _isolation(data)
    try:
        model = runtime_class(name).config_model
    except ConfigError as exc:
        raise ConfigError(f"'{key}': {exc}") from None
    section = data.get("runtime_config")
    if isinstance(section, RuntimeConfig):
        section = {**section.model_dump(exclude_unset=True), "type": section.type}
    elif section is None:
        section = {}
    elif not isinstance(section, dict):
        raise ConfigError(f"'runtime_config' must be a mapping of the {name} runtime's keys")
    section, paths, ignored = dict(section), {}, []
    node = data.get("node")
    if isinstance(node, dict):
        node = dict(node)
        for old in XAGENT_RUNTIME_KEYS:
            if old not in node:
                continue
            value = node.pop(old)
            if old not in model.model_fields:
                if value is not None:
                    ignored.append(f"node.{old}")
            elif old in section and section[old] != value and not _wins(old):
                continue  # runtime_config's value came from the environment
            else:
                section[old] = value
                paths[old] = f"node.{old}"
    out = {
        **data,
        "isolation": name,
        "runtime": name,
        "runtime_config": validate_config(name, section, paths=paths),
    }
    if node is not None:
        out["node"] = node
    return out, tuple(ignored)


def with_password(url: str, password_file: Path) -> str:
    """``url`` with the password read from ``password_file`` (its first line); ValueError naming
    the file when it cannot be read or is empty."""
    from sqlalchemy.engine import make_url

    try:
        lines = Path(password_file).read_text().splitlines()
    except OSError as exc:
        raise ValueError(
            f"database_password_file {str(password_file)!r} cannot be read: {exc.strerror}"
        ) from None
    if not lines or not lines[0]:
        raise ValueError(f"database_password_file {str(password_file)!r} is empty")
    try:
        parsed = make_url(url)
    except Exception:
        raise ValueError("database_url is not a database URL") from None
    return parsed.set(password=lines[0]).render_as_string(hide_password=False)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) binds to the loopback interface only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def metrics_address(value: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:9100`` for IPv6) as a pair; ValueError naming the expected form."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"metrics_listen must be host:port, e.g. 127.0.0.1:9100 (got {value!r})")
    return host.strip("[]"), int(port)


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
