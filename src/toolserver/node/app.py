"""The node's HTTP API (Starlette), wire-compatible with XAgent's ToolServer client.

Starlette rather than FastAPI: importing FastAPI alone takes ~0.45 s on a small machine, and node
start time is what every cold session waits for. Request bodies are validated with the pydantic
models of :mod:`toolserver.protocol`.

The OpenAPI document is served at ``GET /openapi.json`` (see :mod:`toolserver.node.openapi`).

Statuses: 400 bad request or path outside the workspace, 401 missing/wrong node secret (HTTP and
WebSocket alike), 403 registration disabled, 404 unknown tool (or file, or command), 409 a command
that takes no input or a directory that is not empty, 413 body too large, 422 invalid arguments,
450 output not ready / timed out (JSON body with ``detail`` and partial output), 499 the client
went away and the tool call was cancelled, 500 tool failure.
Streamed commands (:mod:`toolserver.node.commands`) answer NDJSON; ``/terminal`` is a WebSocket
(:mod:`toolserver.node.terminal`).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import logging
import re
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from toolserver import __version__, protocol
from toolserver.disconnect import unless_disconnected
from toolserver.errors import OutputNotReady, ToolArgumentError, ToolError
from toolserver.node.commands import Commands
from toolserver.node.context import NodeContext
from toolserver.node.files import (
    build_workspace_zip,
    list_directory,
    open_file_response,
    open_workspace_file,
    receive_upload,
    remove_path,
    stat_path,
    workspace_tree,
)
from toolserver.node.registered import load_registered_tools, register_tool
from toolserver.node.registry import Registry
from toolserver.node.results import dumps, to_jsonable, wrap_result
from toolserver.node.retrieval import ToolRetriever
from toolserver.node.settings import NodeConfig
from toolserver.node.terminal import Terminals
from toolserver.node.tools import BUILTIN_MODULES

log = logging.getLogger("toolserver.node")

M = TypeVar("M")


class JSONBody(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)


def _error(status: int, detail: str, /, **extra: Any) -> JSONBody:
    return JSONBody({**extra, "detail": detail}, status_code=status)


class SecretMiddleware:
    """Refuses (401) every request and WebSocket without the node secret header, except ``GET /health``."""

    def __init__(self, app: ASGIApp, secret: str | None) -> None:
        self.app = app
        self.secret = secret.encode() if secret else None
        self.header = protocol.SECRET_HEADER.lower().encode()

    def refusal(self, scope: Scope) -> Response | None:
        """The 401 answer for a request without the right secret, else None."""
        if self.secret is None:
            return None
        if scope["path"] == "/health" and scope.get("method") in ("GET", "HEAD"):
            return None
        given = next((v for k, v in scope["headers"] if k == self.header), None)
        if given is None or not secrets.compare_digest(given, self.secret):
            reason = "missing" if given is None else "wrong"
            return _error(401, f"{reason} {protocol.SECRET_HEADER} header: this node only serves its manager")
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and (response := self.refusal(scope)) is not None:
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class NodeApp(Starlette):
    """Starlette, with the POST routes of :attr:`fast` called straight after the secret check.

    Every endpoint is wrapped by :func:`_endpoint` (nothing escapes it), so the framework's
    middleware and its route matching only cost time on the hot path of a tool call.
    """

    fast: dict[str, Handler] = {}
    guard: SecretMiddleware

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            handler = self.fast.get(scope["path"])
            if handler is not None:
                scope["app"] = self
                response = self.guard.refusal(scope) or await handler(Request(scope, receive))
                return await response(scope, receive, send)
        return await super().__call__(scope, receive, send)


Handler = Callable[[Request], Awaitable[Response]]


def _endpoint(func: Handler) -> Handler:
    """Turn every failure of a handler into a JSON error answer; nothing escapes to the server."""

    @functools.wraps(func)
    async def wrapper(request: Request) -> Response:
        try:
            return await func(request)
        except OutputNotReady as exc:
            extra: dict[str, Any] = {}
            partial = getattr(exc, "partial", None)
            if isinstance(partial, dict):
                extra = to_jsonable(partial)
            elif partial is not None:
                extra = {"output": to_jsonable(partial)}
            return _error(protocol.STATUS_OUTPUT_NOT_READY, str(exc), **extra)
        except ToolError as exc:
            return _error(exc.status_code, str(exc))
        except HTTPException as exc:
            return _error(exc.status_code, str(exc.detail))
        except Exception as exc:
            log.exception("%s failed", request.url.path)
            return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    return wrapper


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number (send a finite number)")


#: A JSON escape of a UTF-16 surrogate (\\uD800 to \\uDFFF), which may leave one unpaired.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _unpaired_surrogate(value: Any) -> str | None:
    """The first string in ``value`` (keys included) that is not valid Unicode, else None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def strict_json(text: str | bytes) -> Any:
    """``json.loads`` without NaN and Infinity, and without unpaired surrogates in any string.

    Python's json accepts both; neither is valid input for a tool (a NaN timeout, a path that no
    file system can encode), so they are refused here, before any tool sees them.
    """
    data = json.loads(text, parse_constant=_no_constant)
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    if _SURROGATE_ESCAPE.search(raw) and (bad := _unpaired_surrogate(data)) is not None:
        raise ValueError(f"the string {bad[:40]!r} holds an unpaired UTF-16 surrogate: send valid Unicode")
    return data


async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    """The request's JSON object; an empty body counts as ``{}``."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body larger than {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body.strip():
        return {}
    try:
        data = strict_json(body) if len(body) < 1 << 20 else await anyio.to_thread.run_sync(strict_json, body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HTTPException(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise HTTPException(400, "the request body must be a JSON object")
    return data


def _parse(model: type[M], data: dict[str, Any]) -> M:
    from pydantic import ValidationError

    try:
        return model.model_validate(data)  # type: ignore[attr-defined]
    except ValidationError as exc:
        problems = "; ".join(
            f"'{'.'.join(str(p) for p in e['loc']) or 'body'}': {e['msg']}" for e in exc.errors()
        )
        raise HTTPException(422, f"invalid request: {problems}") from None


def _prepare_state_dir(ctx: NodeContext) -> None:
    try:
        ctx.state_dir.mkdir(parents=True, exist_ok=True)
        if ctx.state_dir.resolve().is_relative_to(ctx.workspace):
            log.warning("state dir %s is inside the workspace: tools can change it", ctx.state_dir)
    except OSError as exc:
        fallback = Path(tempfile.mkdtemp(prefix="toolserver-node-state-"))
        log.warning("cannot use state dir %s (%s); using %s (not kept)", ctx.state_dir, exc, fallback)
        ctx.state_dir = fallback
    shutil.rmtree(ctx.state_dir / "tmp", ignore_errors=True)


def build_registry(ctx: NodeContext) -> Registry:
    """Builtin tools, then the configured extensions, then tools registered by earlier runs."""
    import importlib

    registry = Registry(ctx)
    for name in BUILTIN_MODULES:
        registry.load_module(importlib.import_module(name))
    for ref in ctx.config.extensions:
        registry.load_extension(ref)
    load_registered_tools(registry)
    return registry


async def warm_up(registry: Registry) -> None:
    """What the first tool call would otherwise pay for, done as soon as the node serves (so
    ``/health`` is not delayed): the request models' validators, a worker thread for sync tools,
    and one call of the calculator through the registry. Each step yields to requests first."""
    await asyncio.sleep(0)  # the server starts listening first
    try:
        for model in _request_models():
            await asyncio.sleep(0)
            model.model_rebuild()
        await anyio.to_thread.run_sync(_nothing)
        if "calculator" in registry.tools:
            await registry.execute("calculator", {"expression": "1+1"})
    except Exception as exc:  # only time is lost: the first call does it instead
        log.warning("warm-up after start failed: %s: %s", type(exc).__name__, exc)
    gc.freeze()  # imports and the registry live as long as the node: no full GC passes over them


def _request_models() -> list[Any]:
    from pydantic import BaseModel

    return [
        m
        for m in vars(protocol).values()
        if isinstance(m, type) and issubclass(m, BaseModel) and m.__module__ == protocol.__name__
    ]


def _nothing() -> None:
    return None


def create_app(config: NodeConfig) -> NodeApp:
    """Build the node's ASGI app; tools are registered before it returns (so /health means ready)."""
    ctx = NodeContext(config)
    _prepare_state_dir(ctx)
    registry = build_registry(ctx)
    retriever = ToolRetriever(registry)
    limit = config.request_max_bytes

    async def greeting(request: Request) -> Response:
        return JSONBody(
            {
                "message": "ToolServer node",
                "version": __version__,
                "tools": len(registry.tools),
                "envs": sorted(registry.envs),
                "load_errors": registry.load_errors,
            }
        )

    async def health(request: Request) -> Response:
        return JSONBody({"status": "ok"})

    async def openapi(request: Request) -> Response:
        from toolserver.node.openapi import node_openapi

        return JSONBody(node_openapi(registry))

    async def get_available_tools(request: Request) -> Response:
        visible = registry.visible()
        return JSONBody(
            {
                "available_envs": [e.as_json() for e in registry.envs.values() if not e.hidden],
                "available_tools": [s.name for s in visible],
                "tools_json": [s.schema() for s in visible],
            }
        )

    async def schema_for_tools(request: Request) -> Response:
        req = _parse(protocol.ToolNamesRequest, await _read_json(request, limit))
        found = [registry.tools[n].schema() for n in req.tool_names if n in registry.tools]
        missing = [n for n in req.tool_names if n not in registry.tools]
        return JSONBody({"tools_json": found, "missing_tools": missing})

    async def schema_for_envs(request: Request) -> Response:
        req = _parse(protocol.EnvNamesRequest, await _read_json(request, limit))
        found = [registry.envs[n].as_json() for n in req.env_names if n in registry.envs]
        missing = [n for n in req.env_names if n not in registry.envs]
        return JSONBody({"envs_json": found, "missing_envs": missing})

    async def retrieving_tools(request: Request) -> Response:
        req = _parse(protocol.RetrieveToolsRequest, await _read_json(request, limit))
        names = await retriever.retrieve(req.question, req.top_k)
        return JSONBody({"retrieved_tools": names, "tools_json": [registry.tools[n].schema() for n in names]})

    async def execute_tool(request: Request) -> Response:
        data = await _read_json(request, limit)
        if data.get("arguments") is None:
            data["arguments"] = {}
        req = _parse(protocol.ExecuteToolRequest, data)
        arguments = req.arguments
        if isinstance(arguments, str):
            try:
                arguments = strict_json(arguments) if arguments.strip() else {}
            except ValueError as exc:
                raise ToolArgumentError(f"'arguments' is a string but not valid JSON: {exc}") from None
            if not isinstance(arguments, dict):
                raise ToolArgumentError("'arguments' must be a JSON object of argument names to values")
        spec = registry.tools.get(req.tool_name)
        if spec is not None and spec.inline and not req.env_name:  # microseconds: nothing to cancel
            result = await registry.execute(req.tool_name, arguments)
        else:
            result = await unless_disconnected(
                request.receive, lambda: registry.execute(req.tool_name, arguments, req.env_name)
            )
        return JSONBody(wrap_result(result))

    async def register_new_tool(request: Request) -> Response:
        if not config.allow_register_tool:
            raise HTTPException(
                403, "registering tools is disabled on this node (enable allow_register_tool in its config)"
            )
        req = _parse(protocol.RegisterToolRequest, await _read_json(request, limit))
        schema = await anyio.to_thread.run_sync(register_tool, registry, req.tool_name, req.code)
        return JSONBody(schema)

    async def upload_file(request: Request) -> Response:
        return JSONBody(await receive_upload(request, ctx))

    async def download_file(request: Request) -> Response:
        req = _parse(protocol.DownloadFileRequest, await _read_json(request, limit))
        # opened here, before the answer starts: a file removed or replaced meanwhile is still
        # served whole from the open handle, and a missing one is a 404, never a broken answer
        try:
            handle, size, name = await anyio.to_thread.run_sync(open_workspace_file, ctx, req.file_path)
        except FileNotFoundError:
            raise HTTPException(404, f"file {req.file_path!r} not found in the workspace") from None
        except (IsADirectoryError, NotADirectoryError):
            raise HTTPException(400, f"{req.file_path!r} is not a file") from None
        except OSError as exc:
            raise HTTPException(400, f"cannot read {req.file_path!r}: {exc.strerror or exc}") from None
        return open_file_response(handle, size, name)

    async def download_workspace(request: Request) -> Response:
        archive = await anyio.to_thread.run_sync(build_workspace_zip, ctx)
        return FileResponse(
            archive,
            filename="workspace.zip",
            media_type="application/zip",
            background=BackgroundTask(archive.unlink, missing_ok=True),
        )

    async def get_workspace_structure(request: Request) -> Response:
        return JSONBody(await anyio.to_thread.run_sync(workspace_tree, ctx))

    commands = Commands(ctx)

    async def start_command(request: Request) -> Response:
        req = _parse(protocol.CommandRequest, await _read_json(request, limit))
        job, stream = await commands.start(req)
        return stream or JSONBody(job.info())

    async def list_commands(request: Request) -> Response:
        return JSONBody(commands.list())

    async def connect_command(request: Request) -> Response:
        return commands.connect(_parse(protocol.CommandConnectRequest, await _read_json(request, limit)))

    async def command_stdin(request: Request) -> Response:
        req = _parse(protocol.CommandStdinRequest, await _read_json(request, limit))
        return JSONBody(await commands.stdin(req))

    async def kill_command(request: Request) -> Response:
        req = _parse(protocol.CommandIdRequest, await _read_json(request, limit))
        return JSONBody(await commands.kill(req.id))

    async def files_list(request: Request) -> Response:
        req = _parse(protocol.FilePathRequest, await _read_json(request, limit))
        return JSONBody(await anyio.to_thread.run_sync(list_directory, ctx, req.path))

    async def files_stat(request: Request) -> Response:
        req = _parse(protocol.FilePathRequest, await _read_json(request, limit))
        return JSONBody(await anyio.to_thread.run_sync(stat_path, ctx, req.path))

    async def files_remove(request: Request) -> Response:
        req = _parse(protocol.FilePathRequest, await _read_json(request, limit))
        return JSONBody(await anyio.to_thread.run_sync(remove_path, ctx, req.path, req.recursive))

    async def terminal(websocket: WebSocket) -> None:
        await ctx.service("terminals", Terminals).serve(websocket)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        log.info("node ready: %d tools, workspace %s", len(registry.tools), ctx.workspace)
        warming = asyncio.get_running_loop().create_task(warm_up(registry))
        try:
            yield
        finally:
            warming.cancel()
            await ctx.aclose()

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, str(exc.detail))

    post = ["POST"]
    routes = [
        Route("/", _endpoint(greeting), methods=["GET", "POST"]),
        Route("/health", _endpoint(health), methods=["GET"]),
        Route("/openapi.json", _endpoint(openapi), methods=["GET"]),
        Route("/get_available_tools", _endpoint(get_available_tools), methods=post),
        Route("/get_json_schema_for_tools", _endpoint(schema_for_tools), methods=post),
        Route("/get_json_schema_for_envs", _endpoint(schema_for_envs), methods=post),
        Route("/retrieving_tools", _endpoint(retrieving_tools), methods=post),
        Route("/execute_tool", _endpoint(execute_tool), methods=post),
        Route("/register_new_tool", _endpoint(register_new_tool), methods=post),
        Route("/upload_file", _endpoint(upload_file), methods=post),
        Route("/download_file", _endpoint(download_file), methods=post),
        Route("/download_workspace", _endpoint(download_workspace), methods=post),
        Route("/get_workspace_structure", _endpoint(get_workspace_structure), methods=post),
        Route("/commands", _endpoint(start_command), methods=post),
        Route("/commands", _endpoint(list_commands), methods=["GET"]),
        Route("/commands/connect", _endpoint(connect_command), methods=post),
        Route("/commands/stdin", _endpoint(command_stdin), methods=post),
        Route("/commands/kill", _endpoint(kill_command), methods=post),
        Route("/files/list", _endpoint(files_list), methods=post),
        Route("/files/stat", _endpoint(files_stat), methods=post),
        Route("/files/remove", _endpoint(files_remove), methods=post),
        WebSocketRoute("/terminal", terminal),
    ]
    secret = config.secret.get_secret_value() if config.secret else None
    app = NodeApp(
        routes=routes,
        middleware=[Middleware(SecretMiddleware, secret=secret)],
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error},
    )
    app.guard = SecretMiddleware(app, secret)
    app.fast = {r.path: r.endpoint for r in routes if isinstance(r, Route) and r.methods == {"POST"}}
    app.state.ctx = ctx
    app.state.registry = registry
    return app
