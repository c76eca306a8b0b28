"""The Docker runtime's config (:class:`DockerConfig`) → Engine API bodies (pure functions, no I/O).

:class:`DockerConfig` holds Docker's keys (``runtime_config`` of ``isolation: docker``; XAgent's
``node.image``, ``node.creation_kwargs``, ... are moved there by the manager's settings) and is
validated at load time, ``creation_kwargs`` included. ``creation_kwargs`` takes the keyword
arguments of docker-py's ``containers.run`` that XAgent's manager.yml used (``image``,
``network``, ``volumes``, ``environment``, ``healthcheck``, ...); they are translated here to
the Engine API's create body. Keys that would undo the sandbox (``privileged``, host namespaces,
a mounted Docker socket) or that the runtime manages itself (``name``, ``ports``,
``auto_remove``) are refused with a :class:`ConfigError` naming the key.

Every node is hardened whatever the kwargs say: not privileged, ``CapDrop: [ALL]``,
``no-new-privileges``, memory/CPU/pids limits, a non-root user, an init process that reaps zombies.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, ValidationInfo, model_validator

from toolserver.errors import ConfigError, RuntimeBackendError
from toolserver.protocol import SECRET_ENV
from toolserver.runtimes.base import LABEL_MANAGER, LABEL_NODE, NodeSpec, RuntimeConfig, RuntimeContext

#: Extra labels on every container/volume the runtime creates.
LABEL_VOLUME = "toolserver.volume"
LABEL_ROLE = "toolserver.role"
ROLE_NODE = "node"
NAME_PREFIX = "toolserver-node-"
WORKSPACE = "/workspace"
NODE_HOME = "/home/toolserver"
#: uid:gid of the ``toolserver`` user of docker/node.Dockerfile.
NODE_USER = "10001:10001"
IMAGE_PORT = 31942
NODE_CONFIG_PATH = "/etc/toolserver/node.yml"
#: The image's HEALTHCHECK timing (docker/node.Dockerfile), in ns, reused when the port differs.
HEALTH_TIMING = {"Interval": 30 * 10**9, "Timeout": 3 * 10**9, "StartPeriod": 60 * 10**9, "Retries": 3}
DEFAULT_SOCKETS = ("/var/run/docker.sock", "/run/docker.sock")

_NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([bkmgt]?)b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}

#: docker-py ``containers.run`` keyword → Engine API create-body key (``Config`` level).
_CONFIG_KEYS = {
    "image": "Image",
    "user": "User",
    "working_dir": "WorkingDir",
    "hostname": "Hostname",
    "domainname": "Domainname",
    "stop_signal": "StopSignal",
    "mac_address": "MacAddress",
}
#: docker-py keyword → ``HostConfig`` key, copied as given.
_HOST_KEYS = {
    "cpu_period": "CpuPeriod",
    "cpu_quota": "CpuQuota",
    "cpu_shares": "CpuShares",
    "cpuset_cpus": "CpusetCpus",
    "nano_cpus": "NanoCpus",
    "pids_limit": "PidsLimit",
    "dns": "Dns",
    "dns_search": "DnsSearch",
    "dns_opt": "DnsOptions",
    "runtime": "Runtime",
    "init": "Init",
    "sysctls": "Sysctls",
    "group_add": "GroupAdd",
    "oom_score_adj": "OomScoreAdj",
    "storage_opt": "StorageOpt",
}
#: docker-py keyword → ``HostConfig`` key for sizes ("512m" or bytes).
_SIZE_KEYS = {"mem_limit": "Memory", "memswap_limit": "MemorySwap", "shm_size": "ShmSize"}
#: Accepted for compatibility with XAgent's configs; meaningless here.
_IGNORED = {"detach"}
#: Refused with the reason.
_REFUSED = {
    "name": "the runtime names every node toolserver-node-<node_id>",
    "ports": "the runtime publishes the node port itself (runtime_config.address_mode)",
    "auto_remove": "a removed container loses its workspace and exit status; the manager removes nodes",
    "remove": "a removed container loses its workspace and exit status; the manager removes nodes",
    "restart_policy": "the manager restarts nodes itself",
    "pid_mode": "nodes never share the host's process namespace",
    "ipc_mode": "nodes never share another IPC namespace",
    "userns_mode": "nodes never leave the daemon's user namespace setup",
    "uts_mode": "nodes never share the host's UTS namespace",
    "volumes_from": "mount named volumes or paths with 'volumes' instead",
}
#: security_opt entries (``=`` read as ``:``) that would undo the hardening.
_WEAKENING = {
    "no-new-privileges:false",
    "seccomp:unconfined",
    "apparmor:unconfined",
    "label:disable",
    "systempaths:unconfined",
}
_SUPPORTED = sorted(
    {"command", "cap_add", "entrypoint", "environment", "healthcheck", "labels", "volumes", "network"}
    | {"network_mode", "privileged", "cap_drop", "security_opt", "read_only", "tmpfs", "devices"}
    | {"device_requests", "extra_hosts", "ulimits", "log_config"}
    | set(_CONFIG_KEYS)
    | set(_HOST_KEYS)
    | set(_SIZE_KEYS)
    | _IGNORED
)


def parse_size(value: str | int | float, key: str) -> int:
    """Docker's size syntax (``512m``, ``2g``, ``1024k``, bytes) → bytes."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return int(value)
    match = _SIZE.match(str(value))
    if not match:
        raise ConfigError(f"'{key}': not a size like 512m or 2g (got {value!r})")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def container_name(node_id: str) -> str:
    return NAME_PREFIX + node_id


def volume_name(node_id: str) -> str:
    return f"{NAME_PREFIX}{node_id}-workspace"


ROLE_NETWORK = "network"
#: The bridge option that drops traffic between containers of the network (each node alone on it).
NO_ICC = "com.docker.network.bridge.enable_icc"


def nodes_network_name(manager_id: str) -> str:
    """The manager's own node network: one bridge, inter-container traffic off."""
    return "toolserver-nodes-" + re.sub(r"[^A-Za-z0-9_.-]", "-", manager_id)[:80]


def check_node_id(node_id: str) -> None:
    if not _NODE_ID.match(node_id):
        raise RuntimeBackendError(f"node id {node_id!r} cannot name a container ([A-Za-z0-9_.-], max 100)")


def _env_list(value: Any, key: str) -> dict[str, str]:
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(value, list):
        out = {}
        for item in value:
            name, sep, val = str(item).partition("=")
            if not sep:
                raise ConfigError(f"'{key}': entries must look like NAME=value (got {item!r})")
            out[name] = val
        return out
    raise ConfigError(f"'{key}': a mapping or a list of NAME=value (got {value!r})")


def _command(value: Any, key: str) -> list[str]:
    if isinstance(value, str):
        return shlex.split(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"'{key}': a string or a list of strings (got {value!r})")


def _binds(value: Any, key: str) -> list[str]:
    """docker-py ``volumes`` (dict ``{src: {bind, mode}}`` or list ``src:dst[:mode]``) → Binds."""
    if isinstance(value, dict):
        binds = []
        for src, spec in value.items():
            if isinstance(spec, dict) and "bind" in spec:
                binds.append(f"{src}:{spec['bind']}:{spec.get('mode', 'rw')}")
            elif isinstance(spec, str):
                binds.append(f"{src}:{spec}")
            else:
                raise ConfigError(f"'{key}.{src}': expected {{bind: /path, mode: rw|ro}} (got {spec!r})")
        return binds
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"'{key}': a mapping {{source: {{bind, mode}}}} or a list of src:dst[:mode]")


def socket_paths(docker_url: str | None) -> set[str]:
    """Paths where the Docker socket may live (the defaults and the configured one)."""
    paths = set(DEFAULT_SOCKETS)
    if docker_url and docker_url.startswith("unix://"):
        paths.add(os.path.normpath(docker_url[len("unix://") :]))
    return paths


def refuse_docker_socket(binds: list[str], sockets: set[str], key: str) -> None:
    """Raise ConfigError when a bind would put the Docker socket (or a directory holding it) in a node."""
    for bind in binds:
        src = bind.split(":", 1)[0]
        if not src.startswith("/"):
            continue  # a named volume
        norm = os.path.normpath(src)
        for sock in sockets:
            inside = norm == sock or sock.startswith(norm.rstrip("/") + "/")
            if inside or os.path.basename(norm) == "docker.sock":
                raise ConfigError(
                    f"'{key}': mounting {src} would give the node the Docker socket ({sock}), "
                    "i.e. root on the host; ToolServer never mounts it into nodes"
                )


def _healthcheck(value: Any, key: str) -> dict[str, Any]:
    """docker-py healthcheck dict (test, interval, timeout, retries, start_period; ns) → Engine API."""
    if not isinstance(value, dict):
        raise ConfigError(f"'{key}': a mapping with test/interval/timeout/retries/start_period")
    names = {
        "test": "Test",
        "interval": "Interval",
        "timeout": "Timeout",
        "retries": "Retries",
        "start_period": "StartPeriod",
    }
    out: dict[str, Any] = {}
    for name, val in value.items():
        api = names.get(name) or (name if name in names.values() else None)
        if api is None:
            raise ConfigError(f"'{key}.{name}': unknown healthcheck key (use {', '.join(names)})")
        out[api] = val
    test = out.get("Test")
    if isinstance(test, str):
        out["Test"] = ["CMD-SHELL", test]
    return out


def device_requests(value: Any, key: str) -> list[dict[str, Any]]:
    """docker-py DeviceRequest kwargs (driver, count, device_ids, capabilities, options) → Engine API."""
    if not isinstance(value, list):
        raise ConfigError(f"'{key}': a list of device requests")
    names = {
        "driver": "Driver",
        "count": "Count",
        "device_ids": "DeviceIDs",
        "capabilities": "Capabilities",
        "options": "Options",
    }
    out = []
    for i, req in enumerate(value):
        if not isinstance(req, dict):
            raise ConfigError(f"'{key}[{i}]': a mapping like {{count: -1, capabilities: [[gpu]]}}")
        conv: dict[str, Any] = {}
        for name, val in req.items():
            api = names.get(name) or (name if name in names.values() else None)
            if api is None:
                raise ConfigError(f"'{key}[{i}].{name}': unknown device request key (use {', '.join(names)})")
            conv[api] = val
        out.append(conv)
    return out


@dataclass
class Translated:
    """creation_kwargs split into the create body's ``Config`` and ``HostConfig`` parts."""

    config: dict[str, Any] = field(default_factory=dict)
    host: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    binds: list[str] = field(default_factory=list)
    network: str | None = None
    security_opt: list[str] = field(default_factory=list)


def translate_creation_kwargs(
    kwargs: dict[str, Any], sockets: set[str], where: str = "runtime_config.creation_kwargs"
) -> Translated:
    """Validate and translate ``creation_kwargs`` (given at ``where``); raise ConfigError naming a bad key."""
    out = Translated()
    for name, value in kwargs.items():
        key = f"{where}.{name}"
        if name in _IGNORED:
            continue
        if name in _REFUSED:
            raise ConfigError(f"'{key}' is not accepted: {_REFUSED[name]}")
        if name in _CONFIG_KEYS:
            out.config[_CONFIG_KEYS[name]] = value
        elif name in _HOST_KEYS:
            out.host[_HOST_KEYS[name]] = value
        elif name in _SIZE_KEYS:
            out.host[_SIZE_KEYS[name]] = parse_size(value, key)
        elif name == "command":
            out.config["Cmd"] = _command(value, key)
        elif name == "entrypoint":
            out.config["Entrypoint"] = _command(value, key)
        elif name == "environment":
            out.env = _env_list(value, key)
        elif name == "labels":
            out.labels = (
                {str(k): str(v) for k, v in value.items()}
                if isinstance(value, dict)
                else dict.fromkeys(value, "")
            )
        elif name == "healthcheck":
            out.config["Healthcheck"] = _healthcheck(value, key)
        elif name == "volumes":
            out.binds = _binds(value, key)
            refuse_docker_socket(out.binds, sockets, key)
        elif name in ("network", "network_mode"):
            if value in ("host",) or str(value).startswith("container:"):
                raise ConfigError(f"'{key}': {value!r} would share another network namespace; not allowed")
            out.network = str(value)
        elif name == "privileged":
            if value:
                raise ConfigError(f"'{key}': ToolServer never runs privileged nodes")
        elif name == "cap_drop":
            pass  # always ALL
        elif name == "security_opt":
            out.security_opt = [str(v) for v in value]
            weak = [o for o in out.security_opt if o.replace("=", ":") in _WEAKENING]
            if weak:
                raise ConfigError(f"'{key}': {weak[0]!r} would turn off a protection every node keeps")
        elif name == "cap_add":
            caps = [str(c).upper().removeprefix("CAP_") for c in value]
            if {"ALL", "SYS_ADMIN"} & set(caps):
                raise ConfigError(f"'{key}': ALL and SYS_ADMIN are not granted to nodes (nearly privileged)")
            out.host["CapAdd"] = caps
        elif name == "read_only":
            out.host["ReadonlyRootfs"] = bool(value)
        elif name == "tmpfs":
            if isinstance(value, list):
                value = dict(str(v).partition(":")[::2] for v in value)
            out.host["Tmpfs"] = {str(k): str(v) for k, v in value.items()}
        elif name == "devices":
            out.host["Devices"] = [_device(d, key) for d in value]
        elif name == "device_requests":
            out.host["DeviceRequests"] = device_requests(value, key)
        elif name == "extra_hosts":
            items = value.items() if isinstance(value, dict) else (str(v).split(":", 1) for v in value)
            out.host["ExtraHosts"] = [f"{h}:{ip}" for h, ip in items]
        elif name == "ulimits":
            out.host["Ulimits"] = [{k.capitalize(): v for k, v in u.items()} for u in value]
        elif name == "log_config":
            out.host["LogConfig"] = {k.capitalize(): v for k, v in value.items()}
        else:
            raise ConfigError(f"unknown key '{key}' (supported: {', '.join(_SUPPORTED)})")
    return out


def _device(value: Any, key: str) -> dict[str, str]:
    if isinstance(value, dict):
        return value
    parts = str(value).split(":")
    host = parts[0]
    inner = parts[1] if len(parts) > 1 else host
    perms = parts[2] if len(parts) > 2 else "rwm"
    if not host.startswith("/"):
        raise ConfigError(f"'{key}': expected /dev/host[:/dev/container[:rwm]] (got {value!r})")
    return {"PathOnHost": host, "PathInContainer": inner, "CgroupPermissions": perms}


class DockerConfig(RuntimeConfig):
    """The Docker runtime's own keys (``isolation: docker``)."""

    type: Literal["docker"] = "docker"
    image: str = "toolserver-node:latest"
    docker_url: str | None = Field(
        None, description="Engine address; default $DOCKER_HOST or the local socket"
    )
    address_mode: Literal["published", "network"] = "published"
    network: str | None = None
    read_only_rootfs: bool = False
    port: int = Field(IMAGE_PORT, ge=1, le=65535, description="port the node listens on inside its container")
    creation_kwargs: dict[str, Any] = Field(default_factory=dict, description="docker-py create options")
    device_requests: list[dict[str, Any]] | None = None
    workspace_size: str | int | None = Field(
        None,
        description="size limit of each node's workspace (512m, 10g): an ext4 image loop-mounted on the host "
        "(needs root); none: a Docker volume without a limit",
    )

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> DockerConfig:
        """creation_kwargs and device_requests are checked here, so a bad one stops the manager at load."""
        tr = translate_creation_kwargs(
            dict(self.creation_kwargs),
            socket_paths(self.engine_url()),
            self.key_path(info, "creation_kwargs"),
        )
        if self.network and tr.network and self.network != tr.network:
            raise ConfigError(
                f"'{self.key_path(info, 'network')}' ({self.network!r}) and "
                f"'{self.key_path(info, 'creation_kwargs')}.network' ({tr.network!r}) differ"
            )
        if self.device_requests:
            device_requests(self.device_requests, self.key_path(info, "device_requests"))
        if self.workspace_size is not None:
            parse_size(self.workspace_size, self.key_path(info, "workspace_size"))
        return self

    def engine_url(self) -> str | None:
        """The Engine address given here or in $DOCKER_HOST (None: the default socket)."""
        return self.docker_url or os.environ.get("DOCKER_HOST")


@dataclass
class NodeTemplate:
    """Everything the runtime needs to create a node, compiled once from its config and context."""

    image: str
    port: int
    address_mode: str
    network: str | None
    stop_grace: float
    env: dict[str, str]
    translated: Translated
    host_config: dict[str, Any]
    config_file: str | None = None

    @classmethod
    def from_config(cls, config: DockerConfig, context: RuntimeContext) -> NodeTemplate:
        sockets = socket_paths(config.engine_url())
        tr = translate_creation_kwargs(dict(config.creation_kwargs), sockets)  # checked at load already
        network = config.network or tr.network
        res = context.resources
        host: dict[str, Any] = {
            "Privileged": False,
            "CapDrop": ["ALL"],
            "SecurityOpt": ["no-new-privileges:true", *tr.security_opt],
            "Init": True,
            "ReadonlyRootfs": config.read_only_rootfs,
            "LogConfig": {"Type": "json-file", "Config": {"max-size": "10m", "max-file": "3"}},
        }
        if res.memory is not None:
            memory = parse_size(res.memory, "node.resources.memory")
            host["Memory"] = memory
            host["MemorySwap"] = memory  # no swap on top of the limit
        if res.cpus is not None:
            host["NanoCpus"] = int(res.cpus * 1e9)
        if res.pids_limit is not None:
            host["PidsLimit"] = res.pids_limit
        if config.device_requests:
            host["DeviceRequests"] = device_requests(config.device_requests, "runtime_config.device_requests")
        host.update(tr.host)  # explicit creation_kwargs win over the defaults above
        if "Memory" in tr.host and "MemorySwap" not in tr.host:
            host["MemorySwap"] = tr.host["Memory"]
        if host.get("ReadonlyRootfs"):
            tmpfs = {
                "/tmp": "rw,nosuid,nodev,size=256m,mode=1777",
                NODE_HOME: f"rw,nosuid,nodev,size=64m,mode=0700,uid={NODE_USER.split(':')[0]},"
                f"gid={NODE_USER.split(':')[1]}",
            }
            host["Tmpfs"] = {**tmpfs, **host.get("Tmpfs", {})}
        config_file = str(context.node_config.resolve()) if context.node_config else None
        if config_file:
            refuse_docker_socket([f"{config_file}:{NODE_CONFIG_PATH}"], sockets, "node.config")
        return cls(
            image=str(tr.config.pop("Image", None) or config.image),
            port=config.port,
            address_mode=config.address_mode,
            network=network,
            stop_grace=context.stop_grace_seconds,
            env=dict(context.node_env),
            translated=tr,
            host_config=host,
            config_file=config_file,
        )

    @property
    def network_none(self) -> bool:
        return self.network == "none"

    def node_network(self, manager_id: str) -> str | None:
        """The network a node joins: the configured one, else the manager's own isolated one."""
        if self.network:
            return None if self.network_none else self.network
        return nodes_network_name(manager_id)

    def network_body(self, manager_id: str) -> dict[str, Any]:
        """``POST /networks/create`` body of the manager's node network (see :func:`nodes_network_name`)."""
        return {
            "Name": nodes_network_name(manager_id),
            "Driver": "bridge",
            "CheckDuplicate": True,
            "Options": {NO_ICC: "false"},
            "Labels": {**self.translated.labels, LABEL_MANAGER: manager_id, LABEL_ROLE: ROLE_NETWORK},
        }

    def port_key(self) -> str:
        return f"{self.port}/tcp"

    def labels(self, spec: NodeSpec) -> dict[str, str]:
        return {
            **self.translated.labels,
            LABEL_MANAGER: spec.manager_id,
            LABEL_NODE: spec.node_id,
            LABEL_VOLUME: volume_name(spec.node_id),
            LABEL_ROLE: ROLE_NODE,
        }

    def volume_body(self, spec: NodeSpec) -> dict[str, Any]:
        return {"Name": volume_name(spec.node_id), "Labels": self.labels(spec)}

    def container_body(self, spec: NodeSpec, workspace: str | None = None) -> dict[str, Any]:
        """The ``POST /containers/create`` body of one node; ``workspace`` a host directory to mount
        at /workspace instead of the node's volume."""
        check_node_id(spec.node_id)
        env = {
            **self.translated.env,
            **self.env,
            **spec.env,
            SECRET_ENV: spec.secret,
        }
        binds = [f"{workspace or volume_name(spec.node_id)}:{WORKSPACE}:rw", *self.translated.binds]
        cmd: list[str] = []
        extra: dict[str, Any] = {}
        if self.port != IMAGE_PORT:
            cmd += ["--port", str(self.port)]
            probe = f"import urllib.request as r; r.urlopen('http://127.0.0.1:{self.port}/health', timeout=2)"
            extra["Healthcheck"] = {"Test": ["CMD", "python3", "-I", "-S", "-c", probe], **HEALTH_TIMING}
        if self.config_file:
            binds.append(f"{self.config_file}:{NODE_CONFIG_PATH}:ro")
            cmd += ["--config", NODE_CONFIG_PATH]
        host = {**self.host_config, "Binds": binds, **session_limits(spec)}
        body: dict[str, Any] = {
            "Image": self.image,
            "User": NODE_USER,
            "Env": [f"{k}={v}" for k, v in env.items()],
            "Labels": self.labels(spec),
            "StopTimeout": max(0, round(self.stop_grace)),
            **({"Cmd": cmd} if cmd else {}),
            **extra,
            **self.translated.config,
        }
        network = spec.network or self.node_network(spec.manager_id)
        if network == "none" or (network is None and self.network_none):
            host["NetworkMode"] = "none"
        else:
            if network:
                host["NetworkMode"] = network
                body["NetworkingConfig"] = {"EndpointsConfig": {network: {}}}
            if self.address_mode == "published":
                body["ExposedPorts"] = {self.port_key(): {}}
                host["PortBindings"] = {self.port_key(): [{"HostIp": "127.0.0.1", "HostPort": ""}]}
        body["HostConfig"] = host
        return body


def session_limits(spec: NodeSpec) -> dict[str, Any]:
    """HostConfig limits of a session that asked for its own resources (none otherwise)."""
    res = spec.resources
    if res is None:
        return {}
    host: dict[str, Any] = {}
    if res.memory is not None:
        host["Memory"] = host["MemorySwap"] = parse_size(res.memory, "resources.memory")
    if res.cpus is not None:
        host["NanoCpus"] = int(res.cpus * 1e9)
    if res.pids_limit is not None:
        host["PidsLimit"] = res.pids_limit
    return host
