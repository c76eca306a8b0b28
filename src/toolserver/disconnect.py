"""Stop a request's work when its client goes away.

A client that gives up on a tool call (an MCP client cancelling it, say) closes its connection.
The node then cancels the tool, so a shell command is killed and a notebook cell interrupted
instead of running on for no one; the manager's proxy does the same for a client that asks for it
(the ``X-ToolServer-Cancel-On-Disconnect`` header), and so closes its own request to the node.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
from starlette.types import Receive

from toolserver.errors import ToolCancelled

T = TypeVar("T")


async def disconnected(receive: Receive) -> None:
    """Return when the client has gone; call it once the request body has been read."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(receive: Receive, work: Callable[[], Awaitable[T]]) -> T:
    """``await work()``; cancel it and raise ToolCancelled when the client disconnects first.

    Call it once the request body has been read: from then on the only message ``receive`` can
    deliver is ``http.disconnect``.
    """
    with anyio.CancelScope() as scope:

        async def watch() -> None:
            await disconnected(receive)
            scope.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            return await work()
        finally:
            watcher.cancel()
    raise ToolCancelled("the client closed the connection; the tool call was cancelled")
