"""Session lifecycle: create a node for a session, wait until it serves, reconnect, close, release.

Every operation on an existing session checks that the caller may act on it (its owner, or an
admin key); a new session is checked against node.max_nodes and the caller's quotas in the same
locked transaction that inserts its record (:meth:`Store.admit_node`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from toolserver.errors import (
    CapacityExceeded,
    DatabaseUnavailable,
    Draining,
    InvalidSession,
    NodeNotFound,
    NodeStartError,
    QuotaExceeded,
    RuntimeBackendError,
    UnknownSession,
)
from toolserver.manager.activity import ActivityBuffer
from toolserver.manager.auth import ANONYMOUS, Caller
from toolserver.manager.events import SessionEvents
from toolserver.manager.lookups import shared_lookup
from toolserver.manager.metrics import Metrics
from toolserver.manager.models import STOPPED_STATUSES, ToolServerNode, utcnow
from toolserver.manager.settings import Settings
from toolserver.manager.store import START_WINDOW, Admission, Store
from toolserver.protocol import RETRY_AFTER_SECONDS, SessionOptions
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
    owner: str | None = None


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

    def __init__(
        self,
        settings: Settings,
        store: Store,
        runtime: Runtime,
        activity: ActivityBuffer,
        *,
        events: SessionEvents | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.runtime = runtime
        self.activity = activity
        self.events = events or SessionEvents(store, lambda owner: owner or "-")
        self.metrics = metrics or Metrics()
        self.manager_id = settings.manager_id
        #: while True, new sessions are refused (existing ones keep working)
        self.draining = False
        #: new sessions of this process that found the warm pool empty
        self.pool_misses = 0
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
        route = await shared_lookup(self._lookups, node_id, lambda: self._load_route(node_id))
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
        route = Route(
            node.id, node.short_id, node.status, node.ip, node.port, node.secret, now + ROUTE_TTL, node.owner
        )
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

    def _refusal(self, admission: Admission, caller: Caller) -> CapacityExceeded:
        """The error for a refused new session, naming the limit or quota that refused it."""
        quota = caller.quota
        self.metrics.quota_refusals.labels(admission.refused_by or "max_nodes").inc()
        if admission.refused_by == "max_sessions" and quota is not None:
            return QuotaExceeded(
                f"API key {caller.name!r} already has {admission.owned} live sessions (quota max_sessions = "
                f"{quota.max_sessions}); release or close one, or retry later",
                "max_sessions",
                RETRY_AFTER_SECONDS,
            )
        if admission.refused_by == "starts_per_minute" and quota is not None:
            oldest = admission.oldest_start or utcnow()
            wait = max(1, math.ceil((oldest + START_WINDOW - utcnow()).total_seconds()))
            return QuotaExceeded(
                f"API key {caller.name!r} started {admission.starts} sessions in the last minute (quota "
                f"starts_per_minute = {quota.starts_per_minute}); retry in {wait} s",
                "starts_per_minute",
                wait,
            )
        limit = self.settings.node.max_nodes
        return CapacityExceeded(
            f"this manager already runs {admission.live} nodes (node.max_nodes = {limit}); "
            "release a session or retry later",
            RETRY_AFTER_SECONDS,
        )

    async def _check_capacity(self, node: ToolServerNode, caller: Caller) -> None:
        """CapacityExceeded when node.max_nodes nodes are live, QuotaExceeded when the caller's key
        has max_sessions live sessions; call it holding ``self._capacity``."""
        live = await self.store.count_live_nodes(self.manager_id)
        quota = caller.quota if caller.key_id is not None and caller.key_id == node.owner else None
        owned = await self.store.count_live_owned(quota.key_id) if quota and quota.max_sessions else 0
        refused = None
        if live >= self.settings.node.max_nodes:
            refused = "max_nodes"
        elif quota and quota.max_sessions and owned >= quota.max_sessions:
            refused = "max_sessions"
        if refused:
            raise self._refusal(Admission(False, live, owned, refused_by=refused), caller)

    async def _reserve(self, pooled: bool, caller: Caller, labels: dict[str, str] | None) -> ToolServerNode:
        """Insert a new record unless the manager is at node.max_nodes or the caller at a quota
        (atomic across processes)."""
        node = ToolServerNode.new(
            self.manager_id, self.runtime.name, pooled=pooled, owner=caller.key_id, labels=labels or {}
        )
        async with self._capacity:  # within this process, callers queue here rather than in the database
            admission = await self.store.admit_node(node, self.settings.node.max_nodes, caller.quota)
        if not admission.admitted:
            raise self._refusal(admission, caller)
        return node

    async def create(
        self, caller: Caller = ANONYMOUS, options: SessionOptions | None = None
    ) -> ToolServerNode:
        """A node for a new session of ``caller``: a ready warm-pool node if there is one, else a
        cold start. Draining, QuotaExceeded or CapacityExceeded when none may start now."""
        if self.draining:
            raise Draining("this manager is draining: it takes no new sessions (use another manager)")
        options = options or SessionOptions()
        started = time.monotonic()
        if self.settings.node.warm_pool_size > 0:
            health = HEALTHY if self.settings.node.health_check else None
            node, admission = await self.store.claim_pooled(
                self.manager_id, health, owner=caller.key_id, labels=options.labels, quota=caller.quota
            )
            if self.on_claim is not None:
                self.on_claim()
            if not admission.admitted:
                raise self._refusal(admission, caller)
            if node is not None:
                seconds = time.monotonic() - started
                self.metrics.session_started("pool", seconds)
                self.events.log(node, "claimed", f"warm pool, {seconds:.2f} s")
                return node
            self.pool_misses += 1
            self.metrics.pool_misses.inc()
        node = await self.start_node(caller=caller, labels=options.labels)
        seconds = time.monotonic() - started
        self.metrics.session_started("cold", seconds)
        self.events.log(node, "created", f"cold start, {seconds:.2f} s")
        return node

    async def start_node(
        self, pooled: bool = False, caller: Caller = ANONYMOUS, labels: dict[str, str] | None = None
    ) -> ToolServerNode:
        """Create, start and wait for a new node; on any failure nothing is left behind."""
        node = await self._reserve(pooled, caller, labels)
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
                if not pooled:
                    reason = str(exc) or type(exc).__name__
                    await self.events.record(node, "failed", reason, level=logging.WARNING)
                if isinstance(exc, NodeStartError | RuntimeBackendError):
                    self.metrics.runtime_errors.labels(type(exc).__name__).inc()
                    raise
                if isinstance(exc, Exception):
                    raise NodeStartError(f"node {node.short_id} failed to start: {exc}") from exc
                raise
            fields = info_fields(info)
            await self.store.update_node(
                node.id, **fields, status_changed_at=utcnow(), last_req_time=utcnow()
            )
            node.status, node.health, node.ip, node.port = info.status, info.health, info.host, info.port
            log.debug("node %s ready at %s:%s", node.short_id, info.host, info.port)
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

    async def session(self, node_id: str | None, caller: Caller = ANONYMOUS) -> ToolServerNode:
        """The record of the session with cookie ``node_id``: InvalidSession when there is none,
        NotYourSession when it belongs to another key."""
        node_id = _checked_token(node_id)
        node = await self.store.get_node(node_id)
        if node is None or node.pooled:
            raise InvalidSession(f"invalid node_id: {node_id}")
        caller.check_owner(node.owner)
        return node

    async def by_short_id(self, short_id: str, caller: Caller = ANONYMOUS) -> ToolServerNode:
        """The session with ``short_id`` (admin API); UnknownSession or NotYourSession."""
        node = await self.store.get_node_by_short_id(short_id) if len(short_id) <= 32 else None
        if node is None or node.manager_id != self.manager_id:
            raise UnknownSession(f"no session {short_id!r} on this manager")
        caller.check_owner(node.owner)
        return node

    async def reconnect(self, node_id: str | None, caller: Caller = ANONYMOUS) -> ToolServerNode:
        """Restart the session's node (workspace kept) and wait until it serves again."""
        return await self.reconnect_node(await self.session(node_id, caller), caller)

    async def reconnect_node(self, node: ToolServerNode, caller: Caller = ANONYMOUS) -> ToolServerNode:
        async with self._busy(node.id):
            if node.status in STOPPED_STATUSES:
                async with self._capacity:
                    await self._check_capacity(node, caller)
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
                await self.events.record(node, "failed", f"reconnect: {exc}", level=logging.WARNING)
                raise
            await self.store.update_node(
                node.id, **info_fields(info), status_changed_at=utcnow(), last_req_time=utcnow()
            )
            await self.events.record(node, "reconnected")
            return node

    async def close(self, node_id: str | None, caller: Caller = ANONYMOUS) -> ToolServerNode:
        """Stop the session's node; its record stays, and reconnect starts it again."""
        return await self.close_node(await self.session(node_id, caller))

    async def close_node(self, node: ToolServerNode, detail: str | None = None) -> ToolServerNode:
        async with self._busy(node.id):
            await self._stop(node, detail)
        return node

    async def _stop(self, node: ToolServerNode, detail: str | None = None, event: bool = True) -> None:
        with contextlib.suppress(NodeNotFound):
            await self.runtime.stop(node.runtime_state, self.settings.node.stop_grace_seconds)
        await self.store.update_node(node.id, status="exited", health="unhealthy", status_changed_at=utcnow())
        if event:
            await self.events.record(node, "closed", detail)

    async def release(self, node_id: str | None, caller: Caller = ANONYMOUS) -> ToolServerNode:
        """Kill and remove the session's node and delete its record."""
        return await self.release_node(await self.session(node_id, caller))

    async def release_node(self, node: ToolServerNode, detail: str | None = None) -> ToolServerNode:
        async with self._busy(node.id):
            await self._release(node, detail)
        return node

    async def _release(self, node: ToolServerNode, detail: str | None = None) -> None:
        with contextlib.suppress(NodeNotFound):
            await self.runtime.kill(node.runtime_state)
            await self.runtime.remove(node.runtime_state)
        await self.store.delete_nodes([node.id])
        self.activity.forget(node.id)
        if node.pooled:
            log.debug("pool node %s released", node.short_id)
        else:
            await self.events.record(node, "released", detail)

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
                        await self._stop(node, "manager shutdown", event=not node.pooled)
                except Exception:
                    log.exception("could not stop node %s", info.node_id)

        await asyncio.gather(*(one(i) for i in running))
