"""Session lifecycle: create a node for a session, hand it over, reconnect, close, release, remove.

This is the one place that decides what each change to a node does; the checker calls it too.
Every operation on an existing session checks that the caller may act on it (its owner, or an
admin key); a new session is checked against node.max_nodes and the caller's quotas in the same
locked transaction that inserts its record (:meth:`Store.admit_node`). A record is inserted
``starting``, owned by this process until a deadline (see
:class:`~toolserver.manager.models.Ownership`), and becomes the session's only in
:meth:`SessionService.hand_over`, just before the answer carrying its cookie goes out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
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
from toolserver.manager.fork import Forks
from toolserver.manager.lookups import shared_lookup
from toolserver.manager.metrics import Metrics
from toolserver.manager.models import Ownership, ToolServerNode, utcnow
from toolserver.manager.options import check_options, check_timeout, expires_text, expiry, node_resources
from toolserver.manager.settings import Settings
from toolserver.manager.store import START_WINDOW, Admission, Store, this_process
from toolserver.manager.wake import Sleep
from toolserver.protocol import RETRY_AFTER_SECONDS, SessionOptions
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
#: Nodes stopped at once at shutdown: a stop mostly waits for the node to exit (its grace).
SHUTDOWN_STOPS = 32
#: Expired routes are dropped when the cache grows past this many entries.
ROUTE_CACHE_PRUNE_AT = 1024
#: Time a ready node's record may stay ``starting`` while its cookie is handed over.
HANDOVER_SECONDS = 10.0


def node_options_of(options: SessionOptions) -> dict[str, Any] | None:
    """The options that shape a node, as its record keeps them (None: a default node)."""
    kept = options.model_dump(include={"env", "resources", "network"}, exclude_none=True)
    kept = {k: v for k, v in kept.items() if v}
    return kept or None


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
    owner: str | None = None
    #: how the checker put the node to sleep (:class:`~toolserver.manager.models.Asleep`), if it did
    asleep: str | None = None
    #: set on the route a wake returned: ``resumed`` or ``restarted`` (the X-Node-Woken header)
    woken: str | None = None
    #: the session's expiry as the X-Session-Expires header gives it
    expires_at: str | None = None
    #: False for a route cached from the manager's own write (the hand-over), not read back: it
    #: saves the session's first request a read, but does not serve through a database outage
    read: bool = True

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
        #: this process, as the ``creator`` of the records it starts
        self.creator = this_process()
        #: the bound of a whole create: the runtime's create and start, then the readiness wait
        self.create_timeout = settings.node.creation_wait_seconds + runtime.start_budget
        #: while True, new sessions are refused (existing ones keep working)
        self.draining = False
        #: new sessions of this process that found the warm pool empty
        self.pool_misses = 0
        #: node ids in the middle of an operation; the checker leaves them alone.
        self.busy: set[str] = set()
        self._capacity = asyncio.Lock()
        self._routes: dict[str, Route] = {}
        self._lookups: dict[str, asyncio.Future[Route | None]] = {}
        self._database_down: tuple[float, str] | None = None
        #: called after every warm-pool claim attempt (the pool refills itself)
        self.on_claim: Callable[[], None] | None = None
        #: pause, resume and wake on request (:mod:`toolserver.manager.wake`)
        self.sleep = Sleep(self)
        #: forks (:mod:`toolserver.manager.fork`)
        self.forks = Forks(self)

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
                raise DatabaseUnavailable(self._database_down[1])
            found = await shared_lookup(self._lookups, node_id, lambda: self._load_route(node_id))
        except DatabaseUnavailable as exc:
            if self._database_down is None or now >= self._database_down[0]:
                self._database_down = (time.monotonic() + DATABASE_RETRY_SECONDS, str(exc))
            grace = self.settings.database_outage_grace_seconds
            if route is not None and route.read and now - route.loaded <= grace:
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
            keep = max(self.settings.database_outage_grace_seconds, ROUTE_TTL)
            self._routes = {k: r for k, r in self._routes.items() if now - r.loaded <= keep}
        if node is None or node.ownership != Ownership.SESSION:  # only a handed-over cookie routes
            self._routes.pop(node_id, None)
            return None
        return self._cache_route(node, now)

    def _cache_route(self, node: ToolServerNode, now: float, read: bool = True) -> Route:
        route = Route(
            node.id,
            node.short_id,
            node.status,
            node.ip,
            node.port,
            node.secret,
            now,
            node.owner,
            node.asleep,
            expires_at=expires_text(node.expires_at),
            read=read,
        )
        self._routes[node.id] = route
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
        if admission.refused_by == "cluster_max_nodes":
            return CapacityExceeded(
                f"the cluster already runs {admission.cluster} nodes (cluster.max_nodes = "
                f"{self.settings.cluster.max_nodes}); release a session or retry later",
                RETRY_AFTER_SECONDS,
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
        cluster_limit = self.settings.cluster.max_nodes
        cluster = await self.store.count_cluster_live_nodes() if cluster_limit is not None else 0
        refused = None
        if cluster_limit is not None and cluster >= cluster_limit:
            refused = "cluster_max_nodes"
        elif live >= self.settings.node.max_nodes:
            refused = "max_nodes"
        elif quota and quota.max_sessions and owned >= quota.max_sessions:
            refused = "max_sessions"
        if refused:
            raise self._refusal(Admission(False, live, owned, refused_by=refused, cluster=cluster), caller)

    def _deadline(self, seconds: float) -> datetime:
        return utcnow() + timedelta(seconds=seconds + HANDOVER_SECONDS)

    async def _reserve(
        self, pooled: bool, caller: Caller, labels: dict[str, str] | None, **fields: Any
    ) -> ToolServerNode:
        """Insert a new record unless the manager is at node.max_nodes or the caller at a quota
        (atomic across processes)."""
        node = ToolServerNode.new(
            self.manager_id,
            self.runtime.name,
            pooled=pooled,
            owner=caller.key_id,
            labels=labels or {},
            creator=self.creator,
            deadline=self._deadline(self.create_timeout),
            **fields,
        )
        async with self._capacity:  # within this process, callers queue here rather than in the database
            admission = await self.store.admit_node(
                node, self.settings.node.max_nodes, caller.quota, self.settings.cluster.max_nodes
            )
        if not admission.admitted:
            raise self._refusal(admission, caller)
        return node

    async def create(
        self, caller: Caller = ANONYMOUS, options: SessionOptions | None = None
    ) -> ToolServerNode:
        """A ready node for a new session of ``caller``, still ``starting``: hand it over with
        :meth:`hand_over`. A ready warm-pool node if there is one, else a cold start. Draining,
        QuotaExceeded or CapacityExceeded when none may start now."""
        if self.draining:
            raise Draining("this manager is draining: it takes no new sessions (use another manager)")
        options = options or SessionOptions()
        check_options(options, self.settings, self.runtime)
        started = time.monotonic()
        lifetime = {
            "expires_at": expiry(self.settings, options.timeout_seconds),
            "idle_seconds": options.idle_seconds,
        }
        # a pool node was made with the defaults: it serves only a session that asks for no other node
        if self.settings.node.warm_pool_size > 0 and not options.shapes_node():
            health = NodeHealth.HEALTHY if self.settings.node.health_check else None
            node, admission = await self.store.claim_pooled(
                self.manager_id,
                health,
                creator=self.creator,
                deadline=self._deadline(0),
                owner=caller.key_id,
                labels=options.labels,
                quota=caller.quota,
            )
            if self.on_claim is not None:
                self.on_claim()
            if not admission.admitted:
                raise self._refusal(admission, caller)
            if node is not None:
                if any(lifetime.values()):
                    await self.store.update_node(node.id, **lifetime)
                    node.expires_at, node.idle_seconds = lifetime["expires_at"], lifetime["idle_seconds"]
                seconds = time.monotonic() - started
                self.metrics.session_started("pool", seconds)
                self.events.log(node, "claimed", f"warm pool, {seconds:.2f} s")
                return node
            self.pool_misses += 1
            self.metrics.pool_misses.inc()
        node = await self.start_node(caller=caller, labels=options.labels, options=options, **lifetime)
        seconds = time.monotonic() - started
        self.metrics.session_started("cold", seconds)
        self.events.log(node, "created", f"cold start, {seconds:.2f} s")
        return node

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
        if node.status == NodeStatus.RUNNING:  # its first request (right after this answer) needs no read
            self._cache_route(node, time.monotonic(), read=False)

    async def discard(self, node: ToolServerNode) -> None:
        """Remove a node no client received and its record (a client that left during its create)."""
        await self._discard(node, node.runtime_state)

    async def start_node(
        self,
        pooled: bool = False,
        caller: Caller = ANONYMOUS,
        labels: dict[str, str] | None = None,
        options: SessionOptions | None = None,
        *,
        make: Callable[[NodeSpec], Awaitable[NodeInfo]] | None = None,
        **fields: Any,
    ) -> ToolServerNode:
        """Create, start and wait for a new node; on any failure nothing is left behind.

        The whole of it is bounded by ``create_timeout`` (the runtime's start budget plus
        ``node.creation_wait_seconds``). A pool node joins the pool once ready; a session's stays
        ``starting`` until :meth:`hand_over`. ``options`` shape the node (env, resources, network);
        ``make`` replaces the runtime's create (a fork); ``fields`` go into the new record.
        """
        node_options = node_options_of(options) if options is not None else None
        if node_options:
            fields["node_options"] = node_options
        node = await self._reserve(pooled, caller, labels, **fields)
        async with self._busy(node.id):
            state: dict[str, Any] = {}
            try:
                async with asyncio.timeout(self.create_timeout):
                    spec = self.node_spec(node, node.node_options)
                    info = await (make or self.runtime.create)(spec)
                    state = info.state
                    await self.store.update_node(node.id, **info_fields(info))
                    info = await self.runtime.start(state)
                    state = info.state
                    info = await self.wait_ready(state)
            except BaseException as exc:
                await asyncio.shield(self._discard(node, state))
                error = self._start_error(node, exc)
                if error is not None and not pooled:
                    reason = str(error) or type(error).__name__
                    await self.events.record(node, "failed", reason, level=logging.WARNING)
                if isinstance(error, NodeStartError | RuntimeBackendError):
                    self.metrics.runtime_errors.labels(type(error).__name__).inc()
                if error is None or error is exc:
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
            log.debug("node %s ready at %s:%s", node.short_id, info.host, info.port)
            return node

    def node_spec(self, node: ToolServerNode, node_options: dict[str, Any] | None) -> NodeSpec:
        """What the runtime is asked to create for ``node``, with the options it was made with."""
        opts = SessionOptions.model_validate(node_options or {})
        return NodeSpec(
            node_id=node.short_id,
            manager_id=self.manager_id,
            secret=node.secret,
            env=dict(opts.env),
            resources=node_resources(opts, self.settings),
            network=opts.network,
        )

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

    async def session(
        self, node_id: str | None, caller: Caller = ANONYMOUS, *, releasing: bool = False
    ) -> ToolServerNode:
        """The record of the session with cookie ``node_id``: InvalidSession when there is none (or
        its cookie was never handed over; with ``releasing``, a release under way counts),
        NotYourSession when it belongs to another key."""
        node_id = _checked_token(node_id)
        node = await self.store.get_node(node_id)
        allowed = (Ownership.SESSION, Ownership.RELEASING) if releasing else (Ownership.SESSION,)
        if node is None or node.ownership not in allowed:
            raise InvalidSession(f"invalid node_id: {node_id}")
        caller.check_owner(node.owner)
        return node

    async def by_short_id(self, short_id: str, caller: Caller = ANONYMOUS) -> ToolServerNode:
        """The session with ``short_id`` (admin API), whichever replica keeps its record (behind a load
        balancer any replica answers); UnknownSession or NotYourSession."""
        node = await self.store.get_node_by_short_id(short_id) if len(short_id) <= 32 else None
        if node is None:
            raise UnknownSession(f"no session {short_id!r}")
        caller.check_owner(node.owner)
        return node

    async def reconnect(
        self, node_id: str | None, caller: Caller = ANONYMOUS, timeout_seconds: float | None = None
    ) -> ToolServerNode:
        """Restart the session's node (workspace kept) and wait until it serves again. Its expiry
        stays, unless ``timeout_seconds`` moves it (that long from now)."""
        node = await self.session(node_id, caller)
        if timeout_seconds is not None:
            await self.extend_node(node, timeout_seconds)
        return await self.reconnect_node(node, caller)

    async def extend(
        self, node_id: str | None, timeout_seconds: float, caller: Caller = ANONYMOUS
    ) -> ToolServerNode:
        """Move the session's expiry to ``timeout_seconds`` from now (at most the maximum)."""
        node = await self.session(node_id, caller)
        await self.extend_node(node, timeout_seconds)
        return node

    async def extend_node(self, node: ToolServerNode, timeout_seconds: float) -> None:
        check_timeout(self.settings, timeout_seconds)
        node.expires_at = expiry(self.settings, timeout_seconds)
        await self.store.update_node(node.id, expires_at=node.expires_at)
        self.forget_route(node.id)
        await self.events.record(node, "extended", f"expires {expires_text(node.expires_at)}")

    async def reconnect_node(
        self,
        node: ToolServerNode,
        caller: Caller = ANONYMOUS,
        event: tuple[str, str | None] = ("reconnected", None),
    ) -> ToolServerNode:
        async with self._busy(node.id):
            if node.status in STOPPED_STATUSES:
                async with self._capacity:
                    await self._check_capacity(node, caller)
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
                await self.events.record(node, "failed", f"reconnect: {exc}", level=logging.WARNING)
                raise
            await self.store.update_node(
                node.id, **info_fields(info), status_changed_at=utcnow(), last_req_time=utcnow(), asleep=None
            )
            node.status, node.asleep = info.status, None
            await self.events.record(node, *event)
            return node

    async def close(self, node_id: str | None, caller: Caller = ANONYMOUS) -> ToolServerNode:
        """Stop the session's node; its record stays, and reconnect starts it again."""
        return await self.close_node(await self.session(node_id, caller))

    async def close_node(
        self, node: ToolServerNode, detail: str | None = None, asleep: str | None = None
    ) -> ToolServerNode:
        """Stop the node; ``asleep`` (the checker's, for idleness) lets the next request restart it."""
        async with self._busy(node.id):
            await self._stop(node, detail, asleep=asleep)
        return node

    async def _stop(
        self, node: ToolServerNode, detail: str | None = None, event: bool = True, asleep: str | None = None
    ) -> None:
        with contextlib.suppress(NodeNotFound):
            await self.runtime.stop(node.runtime_state, self.settings.node.stop_grace_seconds)
        await self.store.update_node(
            node.id,
            status=NodeStatus.EXITED,
            health=NodeHealth.UNHEALTHY,
            status_changed_at=utcnow(),
            asleep=asleep,
            **({"detail": f"stopped: {detail}"} if detail else {}),
        )
        if event:
            await self.events.record(node, "closed", detail)

    async def release(self, node_id: str | None, caller: Caller = ANONYMOUS) -> ToolServerNode:
        """Kill and remove the session's node and delete its record.

        When the runtime cannot remove it all (an unwritable data directory, Docker down), the
        runtime's error is raised and the record stays as ``releasing``: the checker finishes the
        removal once the runtime allows it, and a second release retries at once.
        """
        return await self.release_node(await self.session(node_id, caller, releasing=True))

    async def release_node(self, node: ToolServerNode, detail: str | None = None) -> ToolServerNode:
        """:meth:`remove` a session's (or a pool's) node, recording its ``released`` event."""
        await self.remove(node, detail)
        return node

    async def remove(
        self,
        node: ToolServerNode,
        detail: str | None = None,
        state: dict[str, Any] | None = None,
        event: str = "released",
    ) -> bool:
        """Kill and remove ``node`` and everything the runtime made for it, then delete its record.

        Used for a session's release and by the checker (long-stopped nodes, creates that never
        finished, releases cut short), which passes the runtime's ``state`` when it has a fresher
        one than the record (a create cut short before writing it). The record is marked
        ``releasing`` first, if it is still owned as ``node`` says (else it changed hands meanwhile,
        a hand-over say, and is left alone): when that write fails nothing has changed yet; after
        it, whatever stops the removal (a runtime error, a crash) leaves a record the checker
        finishes. Records the ``released`` event of a session's node (``failed`` for a create that
        never finished). Returns whether it removed the node.
        """
        was = node.ownership
        async with self._busy(node.id):
            if was != Ownership.RELEASING:
                if not await self.store.mark_releasing(node.id, was):
                    log.info("node %s changed hands meanwhile; not removing it", node.short_id)
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
        if node.pooled:
            log.debug("pool node %s removed", node.short_id)
        elif was == Ownership.STARTING:
            await self.events.record(
                node, "failed", detail or "its create never finished", level=logging.WARNING
            )
        else:
            await self.events.record(node, event, detail)
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
        updated where the database answers. Nodes this manager adopted (marked by another) are
        stopped too; those of its mark that another replica adopted are left alone.
        """
        try:
            records = {n.short_id: n for n in await self.store.list_nodes(self.manager_id)}
        except DatabaseUnavailable as exc:
            log.warning("stopping nodes without updating their records: %s", exc)
            records = None
        marks = sorted({self.manager_id, *(n.origin or n.manager_id for n in (records or {}).values())})
        lists = await asyncio.gather(*(self.runtime.list(m) for m in marks))
        running = [i for found in lists for i in found if i.running]
        if records is None:
            records = {}
        else:
            unknown = [i.node_id for i in running if i.node_id not in records]
            with contextlib.suppress(DatabaseUnavailable):
                elsewhere = await self.store.existing_short_ids(unknown)
                running = [i for i in running if i.node_id in records or i.node_id not in elsewhere]
        sem = asyncio.Semaphore(SHUTDOWN_STOPS)

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
