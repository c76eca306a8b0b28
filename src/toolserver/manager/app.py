"""The manager's HTTP app: session routes, the proxy to nodes, and the checker's lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Cookie, FastAPI, Request
from fastapi.responses import JSONResponse

from toolserver.errors import (
    CapacityExceeded,
    DatabaseUnavailable,
    InvalidSession,
    NodeNotFound,
    NodeStartError,
    RuntimeBackendError,
    RuntimeUnavailable,
)
from toolserver.manager.activity import ActivityBuffer
from toolserver.manager.checker import NodeChecker
from toolserver.manager.proxy import NodeProxy, send_json
from toolserver.manager.sessions import SessionService
from toolserver.manager.settings import Settings
from toolserver.manager.store import open_store
from toolserver.protocol import COOKIE_NAME, RETRY_AFTER_SECONDS
from toolserver.runtimes import Runtime, create_runtime

log = logging.getLogger(__name__)
#: Where the MCP endpoint answers (Streamable HTTP).
MCP_PATHS = frozenset({"/mcp", "/mcp/"})


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    store = await open_store(settings.database_url)
    runtime: Runtime = app.state.runtime or create_runtime(
        settings.runtime_config, settings.runtime_context()
    )
    if settings.ignored_keys:
        log.warning(
            "%s: not settings of the %s runtime, ignored", ", ".join(settings.ignored_keys), runtime.name
        )
    activity = ActivityBuffer(store)
    sessions = SessionService(settings, store, runtime, activity)
    proxy = NodeProxy(sessions, activity, settings.node.request_timeout_seconds)
    checker = NodeChecker(settings, store, runtime, activity=activity, busy=sessions.busy)
    app.state.store, app.state.sessions, app.state.proxy, app.state.checker = store, sessions, proxy, checker
    activity.start()
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
        "manager %s ready (runtime %s, database %s)",
        settings.manager_id,
        runtime.name,
        store.url.render_as_string(hide_password=True),
    )
    try:
        yield
    finally:
        # each step runs even when one before it fails (the database or Docker may be down)
        stop = settings.node.on_shutdown == "stop"
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
        await proxy.aclose()
        await runtime.aclose()
        await store.aclose()


async def _step(what: str, work: Awaitable[None]) -> None:
    """Await one shutdown step; a failure is logged and shutdown goes on."""
    try:
        await work
    except Exception as exc:
        log.warning("shutdown: %s failed: %s", what, exc)


def _error(status: int, detail: str, **headers: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers or None)


class ManagerApp(FastAPI):
    """FastAPI for the manager's own routes; forwarded paths go straight to the proxy.

    Forwarded requests skip the framework's middleware and routing: on the hot path of every tool
    call only the proxy runs. ``forwarded`` maps each path to its methods; another method gets 405.
    ``/mcp`` goes to the MCP endpoint the same way (see :mod:`toolserver.manager.mcp_http`).
    """

    forwarded: dict[str, frozenset[str]] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        methods = self.forwarded.get(scope["path"]) if scope["type"] == "http" else None
        if methods is None:
            if scope["type"] == "http" and scope["path"] in MCP_PATHS and self.state.mcp is not None:
                return await self.state.mcp(scope, receive, send)
            await super().__call__(scope, receive, send)
        elif scope["method"] in methods:
            await self.state.proxy.forward(scope, receive, send)
        else:
            allow = ", ".join(sorted(methods)).encode()
            await send_json(send, 405, {"detail": "Method Not Allowed"}, [(b"allow", allow)])


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
    server_header = f"ToolServerManager/{settings.version}"

    @app.exception_handler(InvalidSession)
    async def _invalid(_: Request, exc: InvalidSession) -> JSONResponse:
        # XAgent's client expects the plain string "invalid node_id: ..."
        return JSONResponse(str(exc), status_code=403)

    @app.exception_handler(CapacityExceeded)
    async def _full(_: Request, exc: CapacityExceeded) -> JSONResponse:
        return _error(429, str(exc), **{"Retry-After": str(RETRY_AFTER_SECONDS)})

    @app.exception_handler(DatabaseUnavailable)
    async def _database(_: Request, exc: DatabaseUnavailable) -> JSONResponse:
        return _error(503, str(exc), **{"Retry-After": str(RETRY_AFTER_SECONDS)})

    @app.exception_handler(NodeNotFound)
    async def _gone(_: Request, exc: NodeNotFound) -> JSONResponse:
        return _error(503, f"node is gone: {exc}; release the session and get a new cookie")

    @app.exception_handler(RuntimeUnavailable)
    async def _unavailable(_: Request, exc: RuntimeUnavailable) -> JSONResponse:
        return _error(503, f"runtime unavailable: {exc}")

    @app.exception_handler(RuntimeBackendError)
    async def _backend(_: Request, exc: RuntimeBackendError) -> JSONResponse:
        return _error(503, f"runtime error: {exc}")

    @app.exception_handler(NodeStartError)
    async def _start(_: Request, exc: NodeStartError) -> JSONResponse:
        return _error(503, str(exc))

    @app.get("/alive")
    async def alive() -> str:
        return "alive"

    @app.post("/get_cookie")
    async def get_cookie(request: Request) -> JSONResponse:
        node = await request.app.state.sessions.create()
        response = JSONResponse({"message": "add cookie", "version": settings.version})
        response.headers["Server"] = server_header
        response.set_cookie(COOKIE_NAME, node.id, httponly=True, samesite="lax")
        return response

    @app.post("/reconnect_session")
    async def reconnect_session(request: Request, node_id: str | None = Cookie(None)) -> str:
        await request.app.state.sessions.reconnect(node_id)
        return f"Reconnect session: {node_id}"

    @app.post("/close_session")
    async def close_session(request: Request, node_id: str | None = Cookie(None)) -> str:
        await request.app.state.sessions.close(node_id)
        return f"Close session: {node_id}"

    @app.post("/release_session")
    async def release_session(request: Request, node_id: str | None = Cookie(None)) -> str:
        await request.app.state.sessions.release(node_id)
        return f"Release session: {node_id}"

    paths = settings.redirect_to_node_path
    app.forwarded = {
        path: frozenset(m for m, ps in (("POST", paths.post), ("GET", paths.get)) if path in ps)
        for path in {*paths.post, *paths.get}
    }
    return app
