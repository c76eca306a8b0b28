"""Session lifecycle: create a node for a session, wait until it serves, reconnect, close, release."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
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
from toolserver.manager.models import STOPPED_STATUSES, ToolServerNode, utcnow
from toolserver.manager.settings import Settings
from toolserver.manager.store import Store
from toolserver.runtimes.base import HEALTHY, RUNNING, NodeInfo, NodeSpec, Runtime

log = logging.getLogger(__name__)

#: How long a routing entry is trusted before the record is read again.
ROUTE_TTL = 1.0
#: Longest pause between two readiness polls of a starting node (a poll is one cheap inspect).
READY_POLL_MAX = 0.05
MAX_TOKEN_LENGTH = 128
#: Expired routes are dropped when the cache grows past this many entries.
ROUTE_CACHE_PRUNE_AT = 1024


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
    expires: float


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
    """Owns every change a session makes to nodes and their records."""

    def __init__(self, settings: Settings, store: Store, runtime: Runtime, activity: ActivityBuffer) -> None:
        self.settings = settings
        self.store = store
        self.runtime = runtime
        self.activity = activity
        self.manager_id = settings.manager_id
        #: node ids in the middle of an operation; the checker leaves them alone.
        self.busy: set[str] = set()
        self._capacity = asyncio.Lock()
        self._routes: dict[str, Route] = {}
        self._lookups: dict[str, asyncio.Future[Route | None]] = {}
        #: called after every warm-pool claim attempt (the pool refills itself)
        self.on_claim: Callable[[], None] | None = None

    # ---- routing ------------------------------------------------------------------------------------

    async def route(self, node_id: str | None) -> Route:
        """The route for a session cookie; raises InvalidSession for a missing or unknown one.

        Routes are cached for ROUTE_TTL seconds; concurrent misses for one node share one read.
        """
        node_id = _checked_token(node_id)
        route = self._routes.get(node_id)
        if route is not None and route.expires >= time.monotonic():
            return route
        pending = self._lookups.get(node_id)
        if pending is None:
            pending = asyncio.ensure_future(self._load_route(node_id))
            self._lookups[node_id] = pending
            pending.add_done_callback(lambda _: self._lookups.pop(node_id, None))
        route = await asyncio.shield(pending)
        if route is None:
            raise InvalidSession(f"invalid node_id: {node_id}")
        return route

    async def _load_route(self, node_id: str) -> Route | None:
        node = await self.store.get_node(node_id)
        now = time.monotonic()
        if len(self._routes) > ROUTE_CACHE_PRUNE_AT:
            self._routes = {k: r for k, r in self._routes.items() if r.expires >= now}
        if node is None:
            self._routes.pop(node_id, None)
            return None
        route = Route(node.id, node.short_id, node.status, node.ip, node.port, node.secret, now + ROUTE_TTL)
        self._routes[node_id] = route
        return route

    def forget_route(self, node_id: str) -> None:
        self._routes.pop(node_id, None)

    # ---- lifecycle ----------------------------------------------------------------------------------

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

    async def _reserve(self, pooled: bool = False) -> ToolServerNode:
        """Insert a new record unless the manager is at node.max_nodes (atomic across processes)."""
        node = ToolServerNode.new(self.manager_id, self.runtime.name, pooled=pooled)
        async with self._capacity:  # within this process, callers queue here rather than in the database
            live = await self.store.add_node_within(node, self.settings.node.max_nodes)
        if live >= self.settings.node.max_nodes:
            raise self._full(live)
        return node

    async def create(self) -> ToolServerNode:
        """A node for a new session: a ready warm-pool node if there is one, else a cold start."""
        if self.settings.node.warm_pool_size > 0:
            health = HEALTHY if self.settings.node.health_check else None
            node = await self.store.claim_pooled(self.manager_id, health)
            if self.on_claim is not None:
                self.on_claim()
            if node is not None:
                log.info("node %s claimed from the warm pool", node.short_id)
                return node
        return await self.start_node()

    async def start_node(self, pooled: bool = False) -> ToolServerNode:
        """Create, start and wait for a new node; on any failure nothing is left behind."""
        node = await self._reserve(pooled)
        async with self._busy(node.id):
            state: dict[str, Any] = {}
            try:
                spec = NodeSpec(node_id=node.short_id, manager_id=self.manager_id, secret=node.secret)
                info = await self.runtime.create(spec)
                state = info.state
                await self.store.update_node(node.id, **info_fields(info))
                info = await self.runtime.start(state)
                state = info.state
                info = await self.wait_ready(state)
            except BaseException as exc:
                await asyncio.shield(self._discard(node, state))
                if isinstance(exc, NodeStartError | RuntimeBackendError):
                    raise
                if isinstance(exc, Exception):
                    raise NodeStartError(f"node {node.short_id} failed to start: {exc}") from exc
                raise
            fields = info_fields(info)
            await self.store.update_node(
                node.id, **fields, status_changed_at=utcnow(), last_req_time=utcnow()
            )
            node.status, node.health, node.ip, node.port = info.status, info.health, info.host, info.port
            log.info("node %s ready at %s:%s", node.short_id, info.host, info.port)
            return node

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
                if info.health == HEALTHY:
                    return info
            elif info.status == RUNNING:
                return info
            if time.monotonic() >= deadline:
                raise NodeStartError(
                    f"node not ready after {wait:g} s (node.creation_wait_seconds; status {info.status}, "
                    f"health {info.health})"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, READY_POLL_MAX)

    async def _discard(self, node: ToolServerNode, state: dict[str, Any]) -> None:
        try:
            if state:
                await self.runtime.kill(state)
                await self.runtime.remove(state)
        except NodeNotFound:
            pass
        except Exception:
            log.exception("could not remove node %s after a failed start", node.short_id)
        await self.store.delete_nodes([node.id])
        self.activity.forget(node.id)

    async def _node(self, node_id: str | None) -> ToolServerNode:
        node_id = _checked_token(node_id)
        node = await self.store.get_node(node_id)
        if node is None:
            raise InvalidSession(f"invalid node_id: {node_id}")
        return node

    async def reconnect(self, node_id: str | None) -> ToolServerNode:
        """Restart the session's node (workspace kept) and wait until it serves again."""
        node = await self._node(node_id)
        async with self._busy(node.id):
            if node.status in STOPPED_STATUSES:
                async with self._capacity:
                    await self._check_capacity()
                    await self.store.update_node(node.id, status="restarting", status_changed_at=utcnow())
            try:
                info = await self.runtime.restart(node.runtime_state, self.settings.node.stop_grace_seconds)
                info = await self.wait_ready(info.state)
            except NodeNotFound:
                await self.store.update_node(
                    node.id,
                    status="exited",
                    health="unhealthy",
                    detail="the node is gone; release the session",
                )
                raise
            except NodeStartError as exc:
                await self.store.update_node(
                    node.id, status="exited", health="unhealthy", detail=str(exc), status_changed_at=utcnow()
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

    async def _stop(self, node: ToolServerNode) -> None:
        with contextlib.suppress(NodeNotFound):
            await self.runtime.stop(node.runtime_state, self.settings.node.stop_grace_seconds)
        await self.store.update_node(node.id, status="exited", health="unhealthy", status_changed_at=utcnow())
        log.info("node %s stopped", node.short_id)

    async def release(self, node_id: str | None) -> ToolServerNode:
        """Kill and remove the session's node and delete its record."""
        node = await self._node(node_id)
        async with self._busy(node.id):
            await self._release(node)
        return node

    async def _release(self, node: ToolServerNode) -> None:
        with contextlib.suppress(NodeNotFound):
            await self.runtime.kill(node.runtime_state)
            await self.runtime.remove(node.runtime_state)
        await self.store.delete_nodes([node.id])
        self.activity.forget(node.id)
        log.info("node %s released", node.short_id)

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
