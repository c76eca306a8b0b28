"""Session lifecycle: create a node for a session, hand it over, reconnect, close, release, remove.

This is the one place that decides what each change to a node does; the checker calls it too.
A record is inserted ``starting``, owned by this process until a deadline (see
:class:`~toolserver.manager.models.Ownership`), and becomes the session's only in
:meth:`SessionService.hand_over`, just before the answer carrying its cookie goes out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from toolserver.errors import (
    CapacityExceeded,
    DatabaseUnavailable,
    InvalidSession,
    NodeNotFound,
    NodeStartError,
    RuntimeBackendError,
)
from toolserver.manager.activity import ActivityBuffer
from toolserver.manager.models import Ownership, ToolServerNode, utcnow
from toolserver.manager.settings import Settings
from toolserver.manager.store import Store, this_process
from toolserver.runtimes.base import NodeInfo, NodeSpec, Runtime
from toolserver.states import STOPPED_STATUSES, NodeHealth, NodeStatus

log = logging.getLogger(__name__)

#: How long a routing entry is trusted before the record is read again.
ROUTE_TTL = 1.0
#: After a failed read, how long routing serves known routes without asking the database again.
DATABASE_RETRY_SECONDS = 1.0
#: Longest pause between two readiness polls of a starting node (a poll is one cheap inspect).
READY_POLL_MAX = 0.05
MAX_TOKEN_LENGTH = 128
#: Expired routes are dropped when the cache grows past this many entries.
ROUTE_CACHE_PRUNE_AT = 1024
#: Time a ready node's record may stay ``starting`` while its cookie is handed over.
HANDOVER_SECONDS = 10.0


def _checked_token(node_id: str | None) -> str:
    """The cookie as given, or InvalidSession when it is missing or longer than any token."""
    if not node_id or len(node_id) > MAX_TOKEN_LENGTH:
        raise InvalidSession(f"invalid node_id: {(node_id or 'None')[:MAX_TOKEN_LENGTH]}")
    return node_id


@dataclass(frozen=True)
class Route:
    """What the proxy needs to forward a request to a node."""

    node_id: str
    short_id: str
    status: str
    host: str
    port: int
    secret: str
    #: monotonic time the record was read
    loaded: float

    @property
    def expires(self) -> float:
        return self.loaded + ROUTE_TTL


def info_fields(info: NodeInfo) -> dict[str, Any]:
    """Record columns that mirror what the runtime reports."""
    return {
        "status": info.status,
        "health": info.health,
        "ip": info.host,
        "port": info.port,
        "runtime_state": info.state,
        "detail": info.detail,
    }


class SessionService:
    """Owns every change a session (or the checker) makes to nodes and their records."""

    def __init__(self, settings: Settings, store: Store, runtime: Runtime, activity: ActivityBuffer) -> None:
        self.settings = settings
        self.store = store
        self.runtime = runtime
        self.activity = activity
        self.manager_id = settings.manager_id
        #: this process, as the ``creator`` of the records it starts
        self.creator = this_process()
        #: the bound of a whole create: the runtime's create and start, then the readiness wait
        self.create_timeout = settings.node.creation_wait_seconds + runtime.start_budget
        #: node ids in the middle of an operation; the checker leaves them alone.
        self.busy: set[str] = set()
        self._capacity = asyncio.Lock()
        self._routes: dict[str, Route] = {}
        self._lookups: dict[str, asyncio.Future[Route | None]] = {}
        self._database_down: tuple[float, DatabaseUnavailable] | None = None
        #: called after every warm-pool claim attempt (the pool refills itself)
        self.on_claim: Callable[[], None] | None = None

    # ---- routing ------------------------------------------------------------------------------------

    async def route(self, node_id: str | None) -> Route:
        """The route for a session cookie; raises InvalidSession for a missing or unknown one.

        Routes are cached for ROUTE_TTL seconds; concurrent misses for one node share one read.
        While the database cannot be read, a route read before the outage keeps serving for
        ``database_outage_grace_seconds`` after that read; other cookies raise DatabaseUnavailable.
        """
        node_id = _checked_token(node_id)
        now = time.monotonic()
        route = self._routes.get(node_id)
        if route is not None and route.expires >= now:
            return route
        try:
            if self._database_down is not None and now < self._database_down[0]:
                # do not queue every request behind a dead connection
                raise DatabaseUnavailable(str(self._database_down[1]))
            pending = self._lookups.get(node_id)
            if pending is None:
                pending = asyncio.ensure_future(self._load_route(node_id))
                self._lookups[node_id] = pending
                pending.add_done_callback(lambda _: self._lookups.pop(node_id, None))
            found = await asyncio.shield(pending)
        except DatabaseUnavailable as exc:
            if self._database_down is None or now >= self._database_down[0]:
                self._database_down = (time.monotonic() + DATABASE_RETRY_SECONDS, exc)
            if route is not None and now - route.loaded <= self.settings.database_outage_grace_seconds:
                return route
            raise
        self._database_down = None
        if found is None:
            raise InvalidSession(f"invalid node_id: {node_id}")
        return found

    async def _load_route(self, node_id: str) -> Route | None:
        node = await self.store.get_node(node_id)
        now = time.monotonic()
        if len(self._routes) > ROUTE_CACHE_PRUNE_AT:
            keep = self.settings.database_outage_grace_seconds
            self._routes = {k: r for k, r in self._routes.items() if now - r.loaded <= max(keep, ROUTE_TTL)}
        if node is None or node.ownership != Ownership.SESSION:  # only a handed-over cookie routes
            self._routes.pop(node_id, None)
            return None
        route = Route(node.id, node.short_id, node.status, node.ip, node.port, node.secret, now)
        self._routes[node_id] = route
        return route

    def forget_route(self, node_id: str) -> None:
        self._routes.pop(node_id, None)

    # ---- creating -----------------------------------------------------------------------------------

    @asynccontextmanager
    async def _busy(self, node_id: str) -> AsyncIterator[None]:
        self.busy.add(node_id)
        try:
            yield
        finally:
            self.busy.discard(node_id)
            self.forget_route(node_id)

    def _full(self, live: int) -> CapacityExceeded:
        limit = self.settings.node.max_nodes
        return CapacityExceeded(
            f"this manager already runs {live} nodes (node.max_nodes = {limit}); "
            "release a session or retry later"
        )

    async def _check_capacity(self) -> None:
        """CapacityExceeded when node.max_nodes nodes are live; call it holding ``self._capacity``."""
        live = await self.store.count_live_nodes(self.manager_id)
        if live >= self.settings.node.max_nodes:
            raise self._full(live)

    def _deadline(self, seconds: float) -> datetime:
        return utcnow() + timedelta(seconds=seconds + HANDOVER_SECONDS)

    async def _reserve(self, pooled: bool = False) -> ToolServerNode:
        """Insert a ``starting`` record unless the manager is at node.max_nodes (atomic across processes)."""
        node = ToolServerNode.new(
            self.manager_id,
            self.runtime.name,
            pooled=pooled,
            creator=self.creator,
            deadline=self._deadline(self.create_timeout),
        )
        async with self._capacity:  # within this process, callers queue here rather than in the database
            live = await self.store.add_node_within(node, self.settings.node.max_nodes)
        if live >= self.settings.node.max_nodes:
            raise self._full(live)
        return node

    async def create(self) -> ToolServerNode:
        """A ready node for a new session, still ``starting``: hand it over with :meth:`hand_over`.

        A ready warm-pool node if there is one, else a cold start.
        """
        if self.settings.node.warm_pool_size > 0:
            health = NodeHealth.HEALTHY if self.settings.node.health_check else None
            node = await self.store.claim_pooled(self.manager_id, health, self.creator, self._deadline(0))
            if self.on_claim is not None:
                self.on_claim()
            if node is not None:
                log.info("node %s claimed from the warm pool", node.short_id)
                return node
        return await self.start_node()

    async def hand_over(self, node: ToolServerNode) -> None:
        """Make ``node`` its session's, right before the answer with its cookie goes out.

        Raises NodeStartError when its record was removed meanwhile (past its deadline), and
        DatabaseUnavailable when the record cannot be written; either way the node is discarded.
        """
        try:
            handed = await self.store.hand_over(node.id)
        except BaseException:
            await asyncio.shield(self.discard(node))
            raise
        if not handed:
            await self.discard(node)
            raise NodeStartError(
                f"node {node.short_id} was removed before its cookie went out (the create outlived its "
                "deadline); retry"
            )

    async def discard(self, node: ToolServerNode) -> None:
        """Remove a node no client received and its record (a client that left during its create)."""
        await self._discard(node, node.runtime_state)

    async def start_node(self, pooled: bool = False) -> ToolServerNode:
        """Create, start and wait for a new node; on any failure nothing is left behind.

        The whole of it is bounded by ``create_timeout`` (the runtime's start budget plus
        ``node.creation_wait_seconds``). A pool node joins the pool once ready; a session's stays
        ``starting`` until :meth:`hand_over`.
        """
        node = await self._reserve(pooled)
        async with self._busy(node.id):
            state: dict[str, Any] = {}
            try:
                async with asyncio.timeout(self.create_timeout):
                    spec = NodeSpec(node_id=node.short_id, manager_id=self.manager_id, secret=node.secret)
                    info = await self.runtime.create(spec)
                    state = info.state
                    await self.store.update_node(node.id, **info_fields(info))
                    info = await self.runtime.start(state)
                    state = info.state
                    info = await self.wait_ready(state)
            except BaseException as exc:
                await asyncio.shield(self._discard(node, state))
                error = self._start_error(node, exc)
                if error is None:
                    raise
                log.warning("node %s failed to start: %s", node.short_id, error)
                if error is exc:
                    raise
                raise error from exc
            fields = info_fields(info)
            if pooled:
                fields.update(ownership=Ownership.POOL, creator=None, deadline=None)
            await self.store.update_node(
                node.id, **fields, status_changed_at=utcnow(), last_req_time=utcnow()
            )
            node.status, node.health, node.ip, node.port = info.status, info.health, info.host, info.port
            node.runtime_state = info.state
            log.info("node %s ready at %s:%s", node.short_id, info.host, info.port)
            return node

    def _start_error(self, node: ToolServerNode, exc: BaseException) -> Exception | None:
        """What a failed start answers: the error as it is, a NodeStartError, or None (cancelled)."""
        if isinstance(exc, TimeoutError):
            return NodeStartError(
                f"node {node.short_id} not ready after {self.create_timeout:g} s (the runtime's create "
                "and start, then node.creation_wait_seconds)"
            )
        if isinstance(exc, NodeStartError | RuntimeBackendError | DatabaseUnavailable):
            return exc
        if isinstance(exc, Exception):
            return NodeStartError(f"node {node.short_id} failed to start: {exc}")
        return None

    async def wait_ready(self, state: dict[str, Any]) -> NodeInfo:
        """Poll the runtime until the node is healthy (health_check on) or running (off)."""
        wait = self.settings.node.creation_wait_seconds
        deadline = time.monotonic() + wait
        delay = 0.01
        while True:
            info = await self.runtime.inspect(state)
            if info.status in STOPPED_STATUSES:
                raise NodeStartError(f"node exited while starting ({info.detail or 'no detail'})")
            if self.settings.node.health_check:
                if info.health == NodeHealth.HEALTHY:
                    return info
            elif info.status == NodeStatus.RUNNING:
                return info
            if time.monotonic() >= deadline:
                raise NodeStartError(
                    f"node not ready after {wait:g} s (node.creation_wait_seconds; status {info.status}, "
                    f"health {info.health})"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, READY_POLL_MAX)

    async def _discard(self, node: ToolServerNode, state: dict[str, Any]) -> None:
        """Remove a node whose create or hand-over failed, and its record. What the runtime cannot
        remove now (Docker going down, say) the checker removes once it can: the record becomes
        ``releasing`` (or, when even that cannot be written, stays ``starting`` until its deadline)."""
        self.activity.forget(node.id)
        try:
            try:
                if state:
                    await self._kill_and_remove(state)
            except Exception as exc:
                log.warning(
                    "node %s: removing it after a failed start failed (%s); retrying later",
                    node.short_id,
                    exc,
                )
                await self.store.update_node(
                    node.id,
                    ownership=Ownership.RELEASING,
                    creator=None,
                    deadline=None,
                    detail=f"removal pending: {exc}",
                )
                return
            await self.store.delete_nodes([node.id])
        except DatabaseUnavailable as exc:
            log.warning("node %s: its record stays until its deadline (%s)", node.short_id, exc)

    # ---- a session's node ---------------------------------------------------------------------------

    async def _node(self, node_id: str | None, *, releasing: bool = False) -> ToolServerNode:
        """The session's record; InvalidSession for an unknown cookie, or one never handed over."""
        node_id = _checked_token(node_id)
        node = await self.store.get_node(node_id)
        allowed = (Ownership.SESSION, Ownership.RELEASING) if releasing else (Ownership.SESSION,)
        if node is None or node.ownership not in allowed:
            raise InvalidSession(f"invalid node_id: {node_id}")
        return node

    async def reconnect(self, node_id: str | None) -> ToolServerNode:
        """Restart the session's node (workspace kept) and wait until it serves again."""
        node = await self._node(node_id)
        async with self._busy(node.id):
            if node.status in STOPPED_STATUSES:
                async with self._capacity:
                    await self._check_capacity()
                    await self.store.update_node(
                        node.id, status=NodeStatus.RESTARTING, status_changed_at=utcnow()
                    )
            try:
                info = await self.runtime.restart(node.runtime_state, self.settings.node.stop_grace_seconds)
                info = await self.wait_ready(info.state)
            except NodeNotFound:
                await self.store.update_node(
                    node.id,
                    status=NodeStatus.EXITED,
                    health=NodeHealth.UNHEALTHY,
                    detail="the node is gone; release the session",
                )
                raise
            except NodeStartError as exc:
                await self.store.update_node(
                    node.id,
                    status=NodeStatus.EXITED,
                    health=NodeHealth.UNHEALTHY,
                    detail=str(exc),
                    status_changed_at=utcnow(),
                )
                raise
            await self.store.update_node(
                node.id, **info_fields(info), status_changed_at=utcnow(), last_req_time=utcnow()
            )
            log.info("node %s reconnected", node.short_id)
            return node

    async def close(self, node_id: str | None) -> ToolServerNode:
        """Stop the session's node; its record stays, and reconnect starts it again."""
        node = await self._node(node_id)
        async with self._busy(node.id):
            await self._stop(node)
        return node

    async def stop_idle(self, node: ToolServerNode) -> None:
        """Stop a node nobody used for node.idling_close_minutes (the checker)."""
        async with self._busy(node.id):
            await self._stop(node, detail="stopped: idle")

    async def _stop(self, node: ToolServerNode, detail: str | None = None) -> None:
        with contextlib.suppress(NodeNotFound):
            await self.runtime.stop(node.runtime_state, self.settings.node.stop_grace_seconds)
        await self.store.update_node(
            node.id,
            status=NodeStatus.EXITED,
            health=NodeHealth.UNHEALTHY,
            status_changed_at=utcnow(),
            **({"detail": detail} if detail else {}),
        )
        log.info("node %s stopped%s", node.short_id, f" ({detail})" if detail else "")

    async def release(self, node_id: str | None) -> ToolServerNode:
        """Kill and remove the session's node and delete its record.

        When the runtime cannot remove it all (an unwritable data directory, Docker down), the
        runtime's error is raised and the record stays as ``releasing``: the checker finishes the
        removal once the runtime allows it, and a second release retries at once.
        """
        node = await self._node(node_id, releasing=True)
        await self.remove(node, "released")
        return node

    async def remove(self, node: ToolServerNode, why: str, state: dict[str, Any] | None = None) -> bool:
        """Kill and remove ``node`` and everything the runtime made for it, then delete its record.

        Used for a session's release and by the checker (long-stopped nodes, creates that never
        finished, releases cut short), which passes the runtime's ``state`` when it has a fresher
        one than the record (a create cut short before writing it). The record is marked
        ``releasing`` first, if it is still owned as ``node`` says (else it changed hands meanwhile,
        a hand-over say, and is left alone): when that write fails nothing has changed yet; after
        it, whatever stops the removal (a runtime error, a crash) leaves a record the checker
        finishes. Returns whether it removed the node.
        """
        async with self._busy(node.id):
            if node.ownership != Ownership.RELEASING:
                if not await self.store.mark_releasing(node.id, node.ownership):
                    log.info("node %s changed hands meanwhile; not removing it (%s)", node.short_id, why)
                    return False
                node.ownership = Ownership.RELEASING
            self.activity.forget(node.id)
            state = state or node.runtime_state or {"node_id": node.short_id}  # a create cut short
            killed = False
            try:
                with contextlib.suppress(NodeNotFound):
                    await self.runtime.kill(state)
                killed = True
                with contextlib.suppress(NodeNotFound):
                    await self.runtime.remove(state)
            except RuntimeBackendError as exc:
                fields: dict[str, Any] = {"detail": f"removal pending: {exc}"}
                if killed:  # it no longer runs (nor counts against node.max_nodes)
                    fields.update(status=NodeStatus.EXITED, health=NodeHealth.UNHEALTHY)
                await self.store.update_node(node.id, **fields)
                raise type(exc)(
                    f"{exc}; node {node.short_id} is released and is removed as soon as the runtime "
                    "allows (repeating the release is safe)"
                ) from exc
            await self.store.delete_nodes([node.id])
        log.info("node %s removed (%s)", node.short_id, why)
        return True

    async def remove_remains(self, state: dict[str, Any], short_id: str, why: str) -> None:
        """Remove what the runtime still holds of a node that has no record (any more)."""
        await self._kill_and_remove(state)
        log.info("node %s: removed what the runtime held (%s)", short_id, why)

    async def _kill_and_remove(self, state: dict[str, Any]) -> None:
        """Kill, then remove; a node already (partly) gone counts as done."""
        with contextlib.suppress(NodeNotFound):
            await self.runtime.kill(state)
        with contextlib.suppress(NodeNotFound):
            await self.runtime.remove(state)

    async def stop_all(self) -> None:
        """Stop every running node of this manager (shutdown with node.on_shutdown = stop).

        The runtime says what runs, so a database outage leaves no node running; records are
        updated where the database answers.
        """
        running = [i for i in await self.runtime.list(self.manager_id) if i.running]
        try:
            records = {n.short_id: n for n in await self.store.list_nodes(self.manager_id)}
        except DatabaseUnavailable as exc:
            log.warning("stopping nodes without updating their records: %s", exc)
            records = {}
        sem = asyncio.Semaphore(8)

        async def one(info: NodeInfo) -> None:
            async with sem:
                try:
                    node = records.get(info.node_id)
                    if node is None:
                        await self.runtime.stop(info.state, self.settings.node.stop_grace_seconds)
                    else:
                        await self._stop(node)
                except Exception:
                    log.exception("could not stop node %s", info.node_id)

        await asyncio.gather(*(one(i) for i in running))
