"""The manager's HTTP app: session routes, the proxy to nodes, the admin API, and the checker's lifecycle.

:class:`ManagerApp` is the ASGI entry of every request: it authenticates the caller once (see
:mod:`toolserver.manager.auth`), bounds the bodies of its own routes, and sends forwarded paths
straight to the proxy; everything else goes to FastAPI.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Body, Cookie, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from toolserver.errors import (
    AdminRequired,
    CapacityExceeded,
    DatabaseUnavailable,
    Draining,
    InvalidRequest,
    InvalidSession,
    NodeNotFound,
    NodeStartError,
    NotAuthenticated,
    NotYourSession,
    RuntimeBackendError,
    RuntimeUnavailable,
    SessionConflict,
    UnknownSession,
)
from toolserver.manager import admin, dashboard
from toolserver.manager.activity import ActivityBuffer
from toolserver.manager.adoption import cluster_adopter
from toolserver.manager.auth import ANONYMOUS, SCOPE_KEY, Caller, KeyRing, credentials, current_caller
from toolserver.manager.checker import NodeChecker
from toolserver.manager.events import SessionEvents, tick_observer
from toolserver.manager.lifecycle_routes import (
    LIFECYCLE_PATHS,
    add_lifecycle_routes,
    expiry_header,
    optional_body,
    parse_body,
)
from toolserver.manager.limits import limited_body, replay
from toolserver.manager.metrics import Metrics
from toolserver.manager.options import expires_text
from toolserver.manager.proxy import NodeProxy, send_json
from toolserver.manager.session_list import list_sessions, parse_label_filters
from toolserver.manager.sessions import SessionService
from toolserver.manager.settings import Settings
from toolserver.manager.store import open_store
from toolserver.manager.ws_proxy import WebSocketProxy
from toolserver.protocol import COOKIE_NAME, RETRY_AFTER_SECONDS, ReconnectOptions, SessionOptions
from toolserver.runtimes import Runtime, create_runtime

log = logging.getLogger(__name__)
#: Where the MCP endpoint answers (Streamable HTTP).
MCP_PATHS = frozenset({"/mcp", "/mcp/"})


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    store = await open_store(settings.database_url)
    runtime: Runtime = app.state.runtime or create_runtime(
        settings.runtime_config, settings.runtime_context()
    )
    if settings.ignored_keys:
        log.warning(
            "%s: not settings of the %s runtime, ignored", ", ".join(settings.ignored_keys), runtime.name
        )
    activity = ActivityBuffer(store)
    keyring = KeyRing(store, settings) if settings.auth == "api_keys" else None
    events = SessionEvents(store, keyring.name_of if keyring else lambda owner: owner or "-")
    webhooks = start_webhooks(settings, events, metrics)
    sessions = SessionService(settings, store, runtime, activity, events=events, metrics=metrics)
    proxy = NodeProxy(sessions, activity, settings.node.request_timeout_seconds, metrics=metrics)
    adopter = cluster_adopter(settings, store, sessions.creator)
    checker = NodeChecker(sessions, activity=activity, adopter=adopter)
    checker.on_tick = tick_observer(events, metrics)
    app.state.store, app.state.sessions, app.state.proxy, app.state.checker = store, sessions, proxy, checker
    app.state.keyring = keyring
    app.state.ws_proxy = WebSocketProxy(proxy)
    app.state.activity = activity
    activity.start()
    metrics_site = await _serve_metrics(app) if settings.metrics_listen else None
    checker_task: asyncio.Task[None] | None = None
    if settings.builtin_monitor:
        loop = checker.run() if await checker.register() else checker.stand_by()
        checker_task = asyncio.create_task(loop, name="node-checker")
    app.state.checker_task = checker_task
    pool = None
    if settings.node.warm_pool_size > 0:
        from toolserver.manager.pool import WarmPool

        pool = WarmPool(sessions, settings.node.warm_pool_size, settings.node.health_check_interval)
        pool.start()
    app.state.pool = pool
    mcp = None
    if settings.mcp.enabled:
        from toolserver.manager.mcp_http import McpEndpoint

        mcp = McpEndpoint(settings, sessions, proxy, activity)
        await mcp.start()
    app.state.mcp = mcp
    # everything loaded so far lives as long as the process: keep it out of the collector's
    # full passes, which otherwise stall the event loop for ~100 ms now and then
    gc.collect()
    gc.freeze()
    log.info(
        "manager %s ready (runtime %s, database %s, auth %s)",
        settings.manager_id,
        runtime.name,
        store.url.render_as_string(hide_password=True),
        settings.auth,
    )
    try:
        yield
    finally:
        # each step runs even when one before it fails (the database or Docker may be down)
        stop = settings.node.on_shutdown == "stop"
        if metrics_site is not None:
            await _step("closing the metrics listener", metrics_site.cleanup())
        if mcp is not None:  # no client can reach an MCP session's node once this process ends
            await _step("ending the MCP sessions", mcp.aclose())
        if pool is not None:
            await _step("closing the warm pool", pool.aclose(release=stop))
        if checker_task is not None:
            checker_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checker_task
            await _step("removing the NodeChecker record", checker.unregister())
        await _step("writing last request times", activity.aclose())
        if stop:
            await _step("stopping the nodes", sessions.stop_all())
        if checker_task is not None:  # this process held the lease: hand the nodes over now
            await _step("ending the lease", adopter.step_down())
        if webhooks is not None:
            await _step("sending the last webhook events", webhooks.aclose())
        await proxy.aclose()
        await runtime.aclose()
        await store.aclose()


def start_webhooks(settings: Settings, events: SessionEvents, metrics: Metrics | None = None) -> Any:
    """The webhooks' sender, started and fed every session event (None without events.webhooks)."""
    if not settings.events.webhooks:
        return None
    from toolserver.manager.webhooks import Webhooks

    webhooks = Webhooks(settings.events, settings.manager_id, events.owner_name, metrics)
    webhooks.start()
    events.sink = webhooks.emit
    return webhooks


async def _step(what: str, work: Awaitable[None]) -> None:
    """Await one shutdown step; a failure is logged and shutdown goes on."""
    try:
        await work
    except Exception as exc:
        log.warning("shutdown: %s failed: %s", what, exc)


async def _serve_metrics(app: FastAPI) -> Any:
    """``GET /metrics`` without a key on ``metrics_listen`` (an aiohttp site in this event loop)."""
    from aiohttp import web

    from toolserver.manager.settings import metrics_address

    async def handle(_: web.Request) -> web.Response:
        body = await admin.render_metrics(app)
        return web.Response(body=body, headers={"Content-Type": admin.CONTENT_TYPE_LATEST})

    web_app = web.Application()
    web_app.router.add_get("/metrics", handle)
    runner = web.AppRunner(web_app, access_log=None)
    await runner.setup()
    host, port = metrics_address(app.state.settings.metrics_listen)
    await web.TCPSite(runner, host, port).start()
    log.info("metrics on http://%s:%d/metrics (no key)", host, port)
    return runner


def _error(status: int, detail: str, **headers: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers or None)


#: The caller of a public path with ``auth: api_keys``: acts on nothing, is no admin.
NOBODY = Caller(None, "nobody", "user")
WWW_AUTHENTICATE = (b"www-authenticate", b'Bearer realm="toolserver"')


class ManagerApp(FastAPI):
    """FastAPI for the manager's own routes; forwarded paths go straight to the proxy.

    Every request is authenticated here, once, before it goes anywhere (routes mounted later, such
    as an MCP endpoint, sit behind the same check); only :attr:`public_paths` are answered without a
    key. The caller is put in the scope (see :func:`toolserver.manager.auth.current_caller`).
    Forwarded requests skip the framework's middleware and routing: on the hot path of every tool
    call only the key check (a dictionary lookup) and the proxy run. ``forwarded`` maps each path to
    its methods; another method gets 405. Bodies of the paths in :attr:`body_limited` (and under
    ``/admin/``) are read here, bounded by ``limits.body_bytes`` (413 beyond). A WebSocket on a
    forwarded GET path (``/terminal``) goes to :mod:`toolserver.manager.ws_proxy`.
    ``/mcp`` goes to the MCP endpoint, behind the same key check (:mod:`toolserver.manager.mcp_http`).
    """

    forwarded: dict[str, frozenset[str]] = {}
    #: Paths anyone may fetch: liveness, and the dashboard's page (its data needs an admin key).
    public_paths: frozenset[str] = frozenset({"/alive", "/dashboard"})
    body_limited: frozenset[str] = frozenset(
        {"/get_cookie", "/reconnect_session", "/close_session", "/release_session", *LIFECYCLE_PATHS}
    )
    body_limit: int = 64 * 1024

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            return await super().__call__(scope, receive, send)
        path = scope["path"]
        if path == "/alive" and kind == "http" and scope["method"] == "GET":  # probed often: no framework
            return await send_json(send, 200, "alive")
        keyring: KeyRing | None = self.state.keyring
        if keyring is None:
            scope[SCOPE_KEY] = ANONYMOUS
        elif path in self.public_paths:
            scope[SCOPE_KEY] = NOBODY
        else:
            try:
                scope[SCOPE_KEY] = await keyring.verify(credentials(scope["headers"]))
            except NotAuthenticated as exc:
                self.state.metrics.auth_failures.inc()
                if kind != "http":
                    return await send({"type": "websocket.close", "code": 1008})
                return await send_json(send, 401, {"detail": str(exc)}, [WWW_AUTHENTICATE])
            except DatabaseUnavailable as exc:
                retry = (b"retry-after", str(RETRY_AFTER_SECONDS).encode())
                return await send_json(send, 503, {"detail": str(exc)}, [retry])
        methods = self.forwarded.get(path) if kind in ("http", "websocket") else None
        if kind == "websocket" and methods is not None and "GET" in methods:
            await self.state.ws_proxy.forward(scope, receive, send)
        elif methods is None or kind == "websocket":
            if kind == "http" and path in MCP_PATHS and self.state.mcp is not None:
                return await self.state.mcp(scope, receive, send)
            if kind == "http" and (path in self.body_limited or path.startswith("/admin/")):
                try:
                    body = await limited_body(receive, self.body_limit)
                except ConnectionResetError:
                    return None  # nobody is left to answer
                if body is None:
                    detail = f"request body larger than {self.body_limit} bytes (limits.body_bytes)"
                    return await send_json(send, 413, {"detail": detail}, [(b"connection", b"close")])
                receive = replay(body, receive)
            await super().__call__(scope, receive, send)
        elif scope["method"] in methods:
            await self.state.proxy.forward(scope, receive, send)
        else:
            allow = ", ".join(sorted(methods)).encode()
            await send_json(send, 405, {"detail": "Method Not Allowed"}, [(b"allow", allow)])


class CookieAnswer(BaseModel):
    message: str
    version: str
    session_id: str = Field(description="the session's short id (admin API, events, logs)")
    expires_at: str | None = Field(description="when the session is released (ISO 8601 UTC), null: never")


SESSION_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": admin.Detail, "description": "no API key, or an unknown, revoked or expired one"},
    403: {"description": "invalid node_id (a JSON string), or the session belongs to another key"},
    413: {"model": admin.Detail, "description": "body larger than limits.body_bytes"},
    422: {"model": admin.Detail, "description": "the body is not valid session options (names the key)"},
    503: {"model": admin.Detail, "description": "database or runtime unavailable, or the node failed"},
}
NEW_SESSION_ERRORS: dict[int | str, dict[str, Any]] = {
    429: {"model": admin.Detail, "description": "node.max_nodes or a key quota reached (Retry-After)"},
    503: {
        "model": admin.Detail,
        "description": "draining, database or runtime unavailable, or the node failed",
    },
}


def describe_request_errors(errors: Any) -> str:
    """FastAPI's validation errors as one line naming each bad key (values are not echoed)."""
    parts = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ())]
        where = ".".join(loc[1:] if loc and loc[0] in ("body", "query", "path", "cookie") else loc)
        if err.get("type") == "extra_forbidden":
            parts.append(f"unknown key '{where}'")
        else:
            parts.append(f"'{where or 'body'}': {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def create_app(settings: Settings, runtime: Runtime | None = None) -> ManagerApp:
    """Build the manager. ``runtime`` overrides the one named in settings (tests inject faults this way)."""
    app = ManagerApp(
        title="ToolServer manager",
        version=settings.version,
        lifespan=_lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.runtime = runtime
    app.state.metrics = Metrics()
    app.state.keyring = None
    app.state.mcp = None
    app.body_limit = settings.limits.body_bytes
    server_header = f"ToolServerManager/{settings.version}"

    @app.exception_handler(InvalidSession)
    async def _invalid(_: Request, exc: InvalidSession) -> JSONResponse:
        # XAgent's client expects the plain string "invalid node_id: ..."
        return JSONResponse(str(exc), status_code=403)

    @app.exception_handler(NotYourSession)
    async def _not_yours(_: Request, exc: NotYourSession) -> JSONResponse:
        return _error(403, str(exc))

    @app.exception_handler(AdminRequired)
    async def _not_admin(_: Request, exc: AdminRequired) -> JSONResponse:
        return _error(403, str(exc))

    @app.exception_handler(UnknownSession)
    async def _unknown(_: Request, exc: UnknownSession) -> JSONResponse:
        return _error(404, str(exc))

    @app.exception_handler(Draining)
    async def _draining(_: Request, exc: Draining) -> JSONResponse:
        return _error(503, str(exc), **{"Retry-After": str(RETRY_AFTER_SECONDS)})

    @app.exception_handler(SessionConflict)
    async def _conflict(_: Request, exc: SessionConflict) -> JSONResponse:
        return _error(409, str(exc))

    @app.exception_handler(CapacityExceeded)
    async def _full(_: Request, exc: CapacityExceeded) -> JSONResponse:
        return _error(429, str(exc), **{"Retry-After": str(exc.retry_after)})

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, "invalid request: " + describe_request_errors(exc.errors()))

    @app.exception_handler(InvalidRequest)
    async def _bad_request(_: Request, exc: InvalidRequest) -> JSONResponse:
        return _error(422, str(exc))

    @app.exception_handler(DatabaseUnavailable)
    async def _database(_: Request, exc: DatabaseUnavailable) -> JSONResponse:
        return _error(503, str(exc), **{"Retry-After": str(RETRY_AFTER_SECONDS)})

    def runtime_error(status: int, prefix: str = "") -> Any:
        async def handle(_: Request, exc: Exception) -> JSONResponse:
            app.state.metrics.runtime_errors.labels(type(exc).__name__).inc()
            return _error(status, prefix.format(exc=exc) if prefix else str(exc))

        return handle

    app.add_exception_handler(
        NodeNotFound, runtime_error(503, "node is gone: {exc}; release the session and get a new cookie")
    )
    app.add_exception_handler(RuntimeUnavailable, runtime_error(503, "runtime unavailable: {exc}"))
    app.add_exception_handler(RuntimeBackendError, runtime_error(503, "runtime error: {exc}"))
    app.add_exception_handler(NodeStartError, runtime_error(503))

    def sessions_of(request: Request) -> SessionService:
        return request.app.state.sessions  # type: ignore[no-any-return]

    CallerDep = Depends(current_caller)

    @app.get("/alive", tags=["sessions"])
    async def alive() -> str:
        """Liveness; needs no key."""
        return "alive"

    @app.post("/get_cookie", responses=SESSION_ERRORS | NEW_SESSION_ERRORS, tags=["sessions"])
    async def get_cookie(
        request: Request, caller: Caller = CallerDep, options: SessionOptions | None = Body(None)
    ) -> CookieAnswer:
        """Start a session: a node of its own, ready when this answers; its cookie is ``node_id``.

        The body is optional (XAgent sends none): see SessionOptions. The answer names the session
        (``session_id``) and its expiry (``expires_at``, also the X-Session-Expires header).
        """
        sessions = sessions_of(request)
        node = await sessions.create(caller, options)
        if await request.is_disconnected():  # nobody would get the cookie
            log.info("client left during the create of node %s; removing it", node.short_id)
            await sessions.discard(node)
            return _error(503, "client disconnected")  # type: ignore[return-value]
        expires = expires_text(node.expires_at)
        answer = {"message": "add cookie", "version": settings.version, "session_id": node.short_id}
        response = JSONResponse({**answer, "expires_at": expires}, headers=expiry_header(node))
        response.headers["Server"] = server_header
        response.set_cookie(COOKIE_NAME, node.id, httponly=True, samesite="lax")
        # the record becomes the session's now, and the answer goes out with no I/O in between
        await sessions.hand_over(node)
        return response  # type: ignore[return-value]

    @app.get("/sessions", responses=SESSION_ERRORS, tags=["sessions"])
    async def sessions_route(
        request: Request,
        caller: Caller = CallerDep,
        label: list[str] = Query(default=[], description="KEY=VALUE; a session must carry every one"),
    ) -> dict[str, Any]:
        """The caller's sessions (every one for an admin key), those carrying every label asked for."""
        state = request.app.state
        filters = parse_label_filters(label)
        return await list_sessions(state.store, state.activity, caller, filters)

    @app.post(
        "/reconnect_session",
        responses=SESSION_ERRORS | NEW_SESSION_ERRORS,
        tags=["sessions"],
        openapi_extra=optional_body(ReconnectOptions),
    )
    async def reconnect_session(
        request: Request, caller: Caller = CallerDep, node_id: str | None = Cookie(None)
    ) -> str:
        """Restart the session's node (workspace kept) and wait until it serves. The session's
        expiry stays as it was unless the body's ``timeout_seconds`` moves it (from now)."""
        sessions = sessions_of(request)
        await sessions.session(node_id, caller)  # whose session it is comes before what the body says
        options = parse_body(ReconnectOptions, await request.body())
        timeout = options.timeout_seconds if options is not None else None
        node = await sessions.reconnect(node_id, caller, timeout)
        return JSONResponse(f"Reconnect session: {node.short_id}", headers=expiry_header(node))  # type: ignore[return-value]

    @app.post("/close_session", responses=SESSION_ERRORS, tags=["sessions"])
    async def close_session(
        request: Request, caller: Caller = CallerDep, node_id: str | None = Cookie(None)
    ) -> str:
        """Stop the session's node; its record stays and reconnect_session brings it back."""
        node = await sessions_of(request).close(node_id, caller)
        return f"Close session: {node.short_id}"

    @app.post("/release_session", responses=SESSION_ERRORS, tags=["sessions"])
    async def release_session(
        request: Request, caller: Caller = CallerDep, node_id: str | None = Cookie(None)
    ) -> str:
        """Kill and remove the session's node and delete its record."""
        node = await sessions_of(request).release(node_id, caller)
        return f"Release session: {node.short_id}"

    add_lifecycle_routes(app, CallerDep)
    app.include_router(admin.router)
    app.include_router(dashboard.router)

    paths = settings.redirect_to_node_path
    app.forwarded = {
        path: frozenset(m for m, ps in (("POST", paths.post), ("GET", paths.get)) if path in ps)
        for path in {*paths.post, *paths.get}
    }
    return app
