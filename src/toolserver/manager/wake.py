"""Pause, resume, and wake on request.

A session's node sleeps in one of two ways: paused (frozen with its memory: ``/pause_session``, or
the checker with ``node.idle_action: pause``) or stopped for idleness by the checker
(``node.idle_action: stop``; the record's ``asleep`` says so). A request for a sleeping node wakes
it (:meth:`Sleep.wake`): a paused node is resumed, memory intact (``resumed``); a node stopped for
idleness is started again with its workspace (``restarted``); then the request is served, and its
answer carries ``X-Node-Woken``. Concurrent requests for one node share one wake. A node stopped
by ``/close_session`` stays stopped (503), as XAgent expects.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from toolserver.errors import CapacityExceeded, InvalidSession, SessionConflict, ToolServerError
from toolserver.manager.auth import ANONYMOUS, Caller
from toolserver.manager.lookups import shared_lookup
from toolserver.manager.models import Asleep, Ownership, ToolServerNode, utcnow
from toolserver.protocol import EXPIRES_HEADER, RETRY_AFTER_SECONDS, WOKEN_HEADER
from toolserver.states import STOPPED_STATUSES, NodeHealth, NodeStatus

if TYPE_CHECKING:
    from toolserver.manager.sessions import Route, SessionService

log = logging.getLogger(__name__)

#: Values of the X-Node-Woken header.
RESUMED = "resumed"
RESTARTED = "restarted"


def sleeping(route: Route) -> bool:
    """Whether a request for ``route`` should wake its node rather than be refused."""
    return route.status == NodeStatus.PAUSED or (
        route.status in STOPPED_STATUSES and route.asleep == Asleep.STOPPED
    )


class Sleep:
    """Pauses, resumes and wakes the nodes of one :class:`SessionService`."""

    def __init__(self, sessions: SessionService) -> None:
        self.sessions = sessions
        self._wakes: dict[str, asyncio.Future[str | None]] = {}

    def _check_capable(self, what: str = "pause") -> None:
        runtime = self.sessions.runtime
        if "pause" not in runtime.capabilities:
            raise SessionConflict(
                f"the {runtime.name} runtime cannot {what} a node (it lacks the 'pause' capability)"
            )

    async def pause(self, node_id: str | None, caller: Caller = ANONYMOUS) -> ToolServerNode:
        """``/pause_session``: freeze the session's node with its memory."""
        node = await self.sessions.session(node_id, caller)
        await self.pause_node(node, "by /pause_session")
        return node

    async def pause_node(self, node: ToolServerNode, detail: str, asleep: str | None = None) -> None:
        """Freeze a running node; SessionConflict when its tier cannot or it does not run."""
        self._check_capable()
        s = self.sessions
        async with s._busy(node.id):
            if node.status == NodeStatus.PAUSED:
                return
            if node.status != NodeStatus.RUNNING:
                raise SessionConflict(
                    f"node {node.short_id} is {node.status}: only a running node can be paused"
                )
            info = await s.runtime.pause(node.runtime_state)
            await s.store.update_node(
                node.id, status=info.status, status_changed_at=utcnow(), asleep=asleep, detail=None
            )
            node.status, node.asleep = info.status, asleep
            await s.events.record(node, "paused", detail)

    async def resume(self, node_id: str | None, caller: Caller = ANONYMOUS) -> ToolServerNode:
        """``/resume_session``: thaw the session's paused node (a running one is left as it is)."""
        node = await self.sessions.session(node_id, caller)
        if node.status == NodeStatus.PAUSED:
            await self.resume_node(node, "by /resume_session")
        elif node.status != NodeStatus.RUNNING:
            raise SessionConflict(
                f"node {node.short_id} is {node.status}, not paused: reconnect_session starts it again"
            )
        return node

    async def resume_node(self, node: ToolServerNode, detail: str) -> None:
        self._check_capable("resume")
        s = self.sessions
        async with s._busy(node.id):
            info = await s.runtime.resume(node.runtime_state)
            if info.health != NodeHealth.HEALTHY:  # (a runtime that probed it itself says so)
                info = await s.wait_ready(info.state)
            await s.store.update_node(
                node.id,
                status=info.status,
                health=info.health,
                status_changed_at=utcnow(),
                last_req_time=utcnow(),
                asleep=None,
            )
            node.status, node.asleep = info.status, None
            await s.events.record(node, "woken", f"{RESUMED} {detail}")

    async def wake(self, route: Route) -> Route:
        """Wake the node of ``route`` (shared by concurrent callers); the fresh route, with
        ``woken`` set when this call's wake did it."""
        woken = await shared_lookup(self._wakes, route.node_id, lambda: self._wake(route.node_id))
        fresh = await self.sessions.route(route.node_id)
        if woken is None:
            return fresh
        return type(fresh)(**{**fresh.__dict__, "woken": woken})

    async def _wake(self, node_id: str) -> str | None:
        s = self.sessions
        s.forget_route(node_id)
        node = await s.store.get_node(node_id)
        if node is None or node.ownership != Ownership.SESSION:
            raise InvalidSession(f"invalid node_id: {node_id}")
        started = asyncio.get_running_loop().time()
        if node.status == NodeStatus.PAUSED:
            await self.resume_node(node, "by a request")
            kind = RESUMED
        elif node.status in STOPPED_STATUSES and node.asleep == Asleep.STOPPED:
            detail = f"{RESTARTED} by a request (workspace kept, memory lost)"
            await s.reconnect_node(node, event=("woken", detail))
            kind = RESTARTED
        else:
            return None  # woken meanwhile, or never asleep
        s.metrics.wake_seconds.labels(kind).observe(asyncio.get_running_loop().time() - started)
        return kind


def route_headers(route: Route) -> list[tuple[bytes, bytes]]:
    """Answer headers a forwarded request gets from its route: X-Node-Woken, X-Session-Expires."""
    out = []
    if route.woken:
        out.append((WOKEN_HEADER.lower().encode(), route.woken.encode()))
    if route.expires_at:
        out.append((EXPIRES_HEADER.lower().encode(), route.expires_at.encode()))
    return out


def wake_failure(exc: ToolServerError) -> tuple[int, dict[str, Any], list[tuple[bytes, bytes]]]:
    """The answer (status, body, headers) of a request whose node could not be woken."""
    if isinstance(exc, InvalidSession):
        return 403, {"detail": str(exc)}, []
    if isinstance(exc, CapacityExceeded):
        return (
            429,
            {"detail": f"cannot wake the node: {exc}"},
            [(b"retry-after", str(exc.retry_after).encode())],
        )
    retry = [(b"retry-after", str(RETRY_AFTER_SECONDS).encode())]
    return 503, {"detail": f"cannot wake the node: {exc}"}, retry
