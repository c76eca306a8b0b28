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
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar

from toolserver.states import NodeHealth, NodeStatus

#: Label/mark keys put on everything a runtime creates.
LABEL_MANAGER = "toolserver.manager_id"
LABEL_NODE = "toolserver.node_id"

# the words of toolserver.states, under the names the runtimes use
RUNNING = NodeStatus.RUNNING
EXITED = NodeStatus.EXITED
CREATED = NodeStatus.CREATED
HEALTHY = NodeHealth.HEALTHY
UNHEALTHY = NodeHealth.UNHEALTHY
STARTING = NodeHealth.STARTING
UNKNOWN_HEALTH = NodeHealth.UNKNOWN


@dataclass(frozen=True)
class NodeSpec:
    """What the manager asks a runtime to create.

    ``node_id`` is the record's short id (never the session cookie); it names and labels the
    runtime object. ``secret`` must reach the node (environment ``TOOLSERVER_NODE_SECRET``).
    """

    node_id: str
    manager_id: str
    secret: str
    env: dict[str, str] = field(default_factory=dict)


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
    """Abstract runtime. Subclasses: ProcessRuntime, DockerRuntime."""

    name: ClassVar[str]
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

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release client resources (HTTP pools, Docker sessions)."""
