"""Forking a session: a new session whose node starts from a copy of the source's workspace.

The runtime does the copy (:meth:`Runtime.fork`: the process tiers copy the workspace directory;
Docker commits the container's filesystem changes to an image and copies the workspace volume);
the new node is created, started and handed over like any cold start, within node.max_nodes and
the caller's quotas. The source keeps running untouched. Memory is never forked.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from toolserver.errors import InvalidRequest, SessionConflict
from toolserver.manager.auth import ANONYMOUS, Caller
from toolserver.manager.models import ToolServerNode
from toolserver.manager.options import check_options, expiry
from toolserver.protocol import SessionOptions
from toolserver.runtimes.base import NodeInfo, NodeSpec
from toolserver.states import NodeStatus

if TYPE_CHECKING:
    from toolserver.manager.sessions import SessionService

#: Options a fork may set for its new session; the node itself is the source's.
FORK_OPTIONS = frozenset({"labels", "timeout_seconds", "idle_seconds"})


class Forks:
    """Forks the sessions of one :class:`SessionService`."""

    def __init__(self, sessions: SessionService) -> None:
        self.sessions = sessions

    def what_is_copied(self) -> str:
        if self.sessions.runtime.name == "docker":
            return "workspace and the container's filesystem changes copied"
        return "workspace copied"

    async def fork(
        self, node_id: str | None, caller: Caller = ANONYMOUS, options: SessionOptions | None = None
    ) -> tuple[ToolServerNode, ToolServerNode]:
        """(source, new): the new session's node is ready and still ``starting`` (hand it over)."""
        s = self.sessions
        source = await s.session(node_id, caller)
        runtime = s.runtime
        if "fork" not in runtime.capabilities:
            raise SessionConflict(
                f"the {runtime.name} runtime cannot fork a node (it lacks the 'fork' capability)"
            )
        if source.status not in (NodeStatus.RUNNING, NodeStatus.PAUSED, NodeStatus.EXITED):
            raise SessionConflict(f"node {source.short_id} is {source.status}: it cannot be forked now")
        options = options or SessionOptions()
        extra = sorted(options.model_fields_set - FORK_OPTIONS)
        if extra:
            raise InvalidRequest(
                f"'{extra[0]}': a fork's node is made like its source's; only "
                f"{', '.join(sorted(FORK_OPTIONS))} may be given"
            )
        check_options(options, s.settings, runtime)
        started = time.monotonic()

        async def make(spec: NodeSpec) -> NodeInfo:
            return await runtime.fork(source.runtime_state, spec)

        node = await s.start_node(
            caller=caller,
            labels=options.labels if "labels" in options.model_fields_set else dict(source.labels or {}),
            make=make,
            node_options=source.node_options,
            expires_at=expiry(s.settings, options.timeout_seconds),
            idle_seconds=options.idle_seconds or source.idle_seconds,
        )
        seconds = time.monotonic() - started
        await s.events.record(source, "forked", f"into {node.short_id}")
        await s.events.record(node, "forked", f"from {source.short_id}, {seconds:.2f} s; memory not forked")
        return source, node
