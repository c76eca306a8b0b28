"""``toolserver mcp``: a stdio MCP server that forwards to a manager.

For MCP clients that only start local commands (desktop assistants, IDEs). It opens a session of
its own with the manager's HTTP API (through :mod:`toolserver.client`) and releases it when the
client closes stdin; with ``--session`` it attaches to an existing session instead and leaves it
running afterwards, so an XAgent run and a desktop assistant can share one sandbox. Logs go to
stderr: stdout carries the protocol.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
from mcp.server.stdio import stdio_server

from toolserver.client import AsyncSession, AsyncToolServerClient
from toolserver.errors import ClientError, InvalidSession, NodeUnavailable
from toolserver.mcp_server.sandbox import NodeStream, Sandbox
from toolserver.mcp_server.server import build_server
from toolserver.protocol import CANCEL_ON_DISCONNECT_HEADER

log = logging.getLogger(__name__)

DEFAULT_RESOURCE_MAX_BYTES = 10 * 1024 * 1024


class _HttpxStream:
    def __init__(self, resp: httpx.Response) -> None:
        self.status = resp.status_code
        self.media_type = resp.headers.get("content-type")
        length = resp.headers.get("content-length", "")
        self.length = int(length) if length.isdigit() else None
        self._resp = resp

    def chunks(self) -> AsyncIterator[bytes]:
        return self._resp.aiter_raw()


class ClientSandbox(Sandbox):
    """A session's node reached through the manager's HTTP API."""

    def __init__(self, session: AsyncSession) -> None:
        super().__init__()
        self.session = session

    @contextlib.asynccontextmanager
    async def open(
        self, path: str, payload: dict[str, Any] | None, method: str = "POST"
    ) -> AsyncIterator[NodeStream]:
        # a cancelled call closes this request; the header asks the proxy to pass that on
        headers = {CANCEL_ON_DISCONNECT_HEADER: "1"}
        try:
            async with self.session.stream(path, payload, headers, method) as resp:
                if resp.status_code == 403:
                    body = (await resp.aread()).decode(errors="replace")
                    if "invalid node_id" in body:
                        raise InvalidSession(body)
                    raise NodeUnavailable(f"the manager refused the request: {body}", 403)
                yield _HttpxStream(resp)
        except httpx.TimeoutException:
            raise NodeUnavailable("the manager did not answer in time", 504) from None
        except httpx.HTTPError as exc:
            raise NodeUnavailable(f"the manager does not answer: {type(exc).__name__}: {exc}") from None

    async def restart(self) -> None:
        await self.session.reconnect()


async def serve(
    url: str,
    session_id: str | None = None,
    resource_max_bytes: int = DEFAULT_RESOURCE_MAX_BYTES,
    api_key: str | None = None,
) -> int:
    """Serve MCP on stdin/stdout until the client closes it; 1 when no session could be had.

    ``api_key`` (default ``$TOOLSERVER_API_KEY``) is the key the manager knows this client by.
    """
    async with AsyncToolServerClient(url, api_key=api_key) as client:
        try:
            if session_id is not None:
                session = client.attach(session_id)
                await session.get_workspace_structure()  # fails early for an unknown session
            else:
                session = await client.get_cookie()
        except (ClientError, httpx.HTTPError) as exc:
            what = f"session {session_id[:8]}…" if session_id else "a new session"
            print(f"toolserver mcp: cannot get {what} from {url}: {exc}", file=sys.stderr)
            return 1
        sandbox = ClientSandbox(session)

        async def resolve(ctx: Any) -> Sandbox:
            return sandbox

        server = build_server(resolve, resource_max_bytes)
        try:
            async with stdio_server() as (read_stream, write_stream):
                await server.run(read_stream, write_stream, server.create_initialization_options())
        finally:
            if session_id is None:
                with anyio.CancelScope(shield=True), contextlib.suppress(ClientError, httpx.HTTPError):
                    await session.release()
    return 0


def run(
    url: str,
    session_id: str | None = None,
    resource_max_bytes: int = DEFAULT_RESOURCE_MAX_BYTES,
    api_key: str | None = None,
) -> int:
    logging.basicConfig(
        stream=sys.stderr, level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return anyio.run(serve, url, session_id, resource_max_bytes, api_key)
    except KeyboardInterrupt:
        return 0
