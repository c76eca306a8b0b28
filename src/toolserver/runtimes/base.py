"""The runtime contract: how the manager creates, drives and observes nodes.

A runtime only produces an endpoint (host, port) for a node; the manager reaches every node
the same way, through its proxy. Everything a runtime needs to find a node again is kept in
``NodeInfo.state``, a JSON-serialisable dict that the manager stores in the node's record, so a
restarted manager can reattach with :meth:`Runtime.inspect`.

Statuses follow Docker's words: ``created``, ``running``, ``restarting``, ``exited``, ``dead``.
Health follows Docker's too: ``starting``, ``healthy``, ``unhealthy``; ``Unknown`` when the
runtime cannot say (the seed's default).

Every method is a coroutine and never blocks the event loop. Errors: :class:`NodeNotFound` when
the node is already gone, :class:`RuntimeUnavailable` when the backend cannot be reached,
:class:`RuntimeBackendError` for any other failure.

A runtime is one module: its class (a :class:`Runtime` with ``name`` and ``config_model``) and
its config model (a :class:`RuntimeConfig` tagged ``type: Literal["<name>"]``, unknown keys
refused), registered under the entry-point group ``toolserver.runtimes`` (see
:mod:`toolserver.runtimes.registry`). It is built as ``cls(config, context)``: its own config,
plus the :class:`RuntimeContext` every runtime gets from the manager; it never reads the
manager's settings.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo

from toolserver.errors import RuntimeBackendError
from toolserver.states import NodeHealth, NodeStatus

#: Label/mark keys put on everything a runtime creates.
LABEL_MANAGER = "toolserver.manager_id"
LABEL_NODE = "toolserver.node_id"
#: A node address ``host`` that starts so is a Unix socket path (its ``port`` is 0): the ``sandbox``
#: tier's nodes, in network namespaces of their own, serve on one.
UNIX_PREFIX = "unix:"

# the words of toolserver.states, under the names the runtimes use
RUNNING = NodeStatus.RUNNING
PAUSED = NodeStatus.PAUSED
EXITED = NodeStatus.EXITED
CREATED = NodeStatus.CREATED
HEALTHY = NodeHealth.HEALTHY
UNHEALTHY = NodeHealth.UNHEALTHY
STARTING = NodeHealth.STARTING
UNKNOWN_HEALTH = NodeHealth.UNKNOWN


class ResourceLimits(BaseModel):
    """Per-node resource limits, a cross-tier notion (``node.resources``): every runtime that can
    enforce them does (Docker: cgroups through the Engine). ``None`` means no limit."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    memory: str | None = Field("1g", description="memory limit, Docker syntax: 512m, 2g")
    cpus: float | None = Field(1.0, gt=0)
    pids_limit: int | None = Field(256, gt=0)


class RuntimeConfig(BaseModel):
    """Base of every runtime's own config model: subclasses tag it with their name
    (``type: Literal["docker"] = "docker"``) and add their keys; unknown keys are refused.

    The manager reads it from ``runtime_config`` (or moves XAgent's keys there, see
    :mod:`toolserver.manager.settings`) and validates it with the chosen runtime's model at load
    time. Validators that raise ConfigError themselves name a key with :meth:`key_path`, so the
    message shows where the user wrote it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str

    @staticmethod
    def key_path(info: ValidationInfo, name: str) -> str:
        """The dotted path under which key ``name`` was given (``runtime_config.<name>`` unless the
        validation context says otherwise, e.g. ``node.creation_kwargs`` from XAgent's file)."""
        paths = (info.context or {}).get("paths") or {}
        return str(paths.get(name) or f"runtime_config.{name}")


@dataclass(frozen=True)
class RuntimeContext:
    """What the manager hands every runtime besides its own config (the runtime-neutral part).

    ``data_dir`` is where a runtime may keep per-node files; ``node_env`` and ``node_config``
    reach every node (the environment and the node YAML file); ``resources`` are the default
    limits of a node; ``stop_grace_seconds`` is the SIGTERM → SIGKILL grace the manager uses;
    ``health_probe_seconds`` how often ``list`` may ask a healthy node for ``/health`` (runtimes
    that ask the node themselves; 0: every call).
    """

    data_dir: Path
    manager_id: str
    node_env: dict[str, str] = field(default_factory=dict)
    node_config: Path | None = None
    resources: ResourceLimits = field(default_factory=ResourceLimits)
    stop_grace_seconds: float = 5.0
    health_probe_seconds: float = 10.0


@dataclass(frozen=True)
class NodeSpec:
    """What the manager asks a runtime to create.

    ``node_id`` is the record's short id (never the session cookie); it names and labels the
    runtime object. ``secret`` must reach the node (environment ``TOOLSERVER_NODE_SECRET``).
    ``resources`` (None: the context's) and ``network`` (None: the runtime's) come from a session's
    options, only to a runtime whose ``capabilities`` has ``"resources"`` / ``"network"``.
    """

    node_id: str
    manager_id: str
    secret: str
    env: dict[str, str] = field(default_factory=dict)
    resources: ResourceLimits | None = None
    network: str | None = None


@dataclass
class NodeInfo:
    """What a runtime reports about one node."""

    node_id: str
    manager_id: str
    status: str
    health: str = UNKNOWN_HEALTH
    host: str = "0.0.0.0"
    port: int = 0
    state: dict[str, Any] = field(default_factory=dict)
    #: Why the node stopped, when the runtime knows (exit code, "OOMKilled", ...).
    detail: str | None = None

    @property
    def running(self) -> bool:
        return self.status == RUNNING


class Runtime(abc.ABC):
    """Abstract runtime. Subclasses: ProcessRuntime, DockerRuntime (and third-party ones)."""

    #: The runtime's registered name (the ``isolation`` setting, the records' ``runtime`` column).
    name: ClassVar[str]
    #: The runtime's own config model, tagged with ``name``.
    config_model: ClassVar[type[RuntimeConfig]]

    def __init__(self, config: RuntimeConfig, context: RuntimeContext) -> None:
        self.config = config
        self.context = context

    #: Longest the runtime's create and start of one node may take together. The manager bounds a
    #: whole create by this plus ``node.creation_wait_seconds`` (a starting record's deadline).
    start_budget: ClassVar[float] = 30.0

    @abc.abstractmethod
    async def create(self, spec: NodeSpec) -> NodeInfo:
        """Create the node (not necessarily started); return its info with a serialisable state."""

    @abc.abstractmethod
    async def start(self, state: dict[str, Any]) -> NodeInfo:
        """Start a created or stopped node; returns fresh info (its address may change)."""

    @abc.abstractmethod
    async def stop(self, state: dict[str, Any], grace: float = 5.0) -> None:
        """Stop gracefully: terminate, then kill after ``grace`` seconds. A stopped node stays as it is."""

    async def restart(self, state: dict[str, Any], grace: float = 5.0) -> NodeInfo:
        """Stop then start; the workspace survives."""
        await self.stop(state, grace)
        return await self.start(state)

    @abc.abstractmethod
    async def kill(self, state: dict[str, Any]) -> None:
        """Kill at once. Killing a stopped node is a no-op."""

    @abc.abstractmethod
    async def remove(self, state: dict[str, Any]) -> None:
        """Remove the node and everything it owns (workspace included). Already gone counts as done."""

    @abc.abstractmethod
    async def inspect(self, state: dict[str, Any]) -> NodeInfo:
        """Current status, health and address of one node; raises NodeNotFound if it is gone."""

    @abc.abstractmethod
    async def list(self, manager_id: str) -> list[NodeInfo]:
        """Every node carrying ``manager_id``'s mark, with status and health, in one pass."""

    async def leftovers(self, manager_id: str) -> list[NodeInfo]:
        """Pieces of ``manager_id``'s nodes that :meth:`list` does not report, left by a create that
        was cut short (a workspace volume without its container, say), each with a ``state`` that
        :meth:`remove` takes. The manager removes those whose node has no record. None by default."""
        return []

    async def preflight(self) -> None:  # noqa: B027 - optional hook
        """Check that this runtime can run on this machine; raise ConfigError saying what is missing
        and which tier would work instead. The manager calls it once before it serves, and refuses
        to start on failure (it never falls back to a weaker tier by itself)."""

    # --- pause and fork (optional: a runtime that cannot says so in ``capabilities``) ---

    #: What this runtime can do beyond the required methods: ``"pause"`` (freeze a running node
    #: with its memory, :meth:`pause` / :meth:`resume`) and ``"fork"`` (:meth:`fork`); also
    #: ``"resources"`` and ``"network"`` when it applies a :class:`NodeSpec`'s own.
    capabilities: ClassVar[frozenset[str]] = frozenset()

    async def pause(self, state: dict[str, Any]) -> NodeInfo:
        """Freeze a running node with its memory (Docker's pause, the cgroup freezer); the returned
        info has status ``paused``. RuntimeBackendError when the runtime cannot pause."""
        raise RuntimeBackendError(f"runtime {self.name!r} cannot pause a node")

    async def resume(self, state: dict[str, Any]) -> NodeInfo:
        """Thaw a paused node; its processes and memory are as they were. Resuming a running node
        is a no-op."""
        raise RuntimeBackendError(f"runtime {self.name!r} cannot resume a node")

    async def fork(self, state: dict[str, Any], spec: NodeSpec) -> NodeInfo:
        """Create (not start) a new node from ``spec`` whose workspace starts as a copy of the node of
        ``state`` (for container runtimes also its filesystem changes); the source keeps running
        untouched. Memory is not forked."""
        raise RuntimeBackendError(f"runtime {self.name!r} cannot fork a node")

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release client resources (HTTP pools, Docker sessions)."""
