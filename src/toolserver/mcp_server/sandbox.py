"""What the MCP layer needs from a session's node: JSON calls and streamed file reads.

A :class:`Sandbox` opens one request to the node's API (:meth:`Sandbox.open`); everything else —
reading JSON answers, bounded file reads, restarting a node the checker stopped — is written once
here. The manager reaches the node directly, through the route and secret its proxy uses
(:class:`toolserver.manager.mcp_http.NodeSandbox`); ``toolserver mcp`` goes through the manager's
HTTP API with the SDK (:class:`toolserver.mcp_server.stdio.ClientSandbox`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import mimetypes
import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from toolserver.errors import (
    DatabaseUnavailable,
    InvalidSession,
    NodeUnavailable,
    ResourceError,
    ResourceTooLarge,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Largest answer to a JSON call that is read (a tool result with images, say).
MAX_ANSWER_BYTES = 64 * 1024 * 1024
#: The proxy's answer for a node the checker stopped (``node is not running: <id> (exited)``).
_STOPPED = re.compile(r"^node is not running: \S+ \((exited|dead)\)")
GONE = "this session's sandbox no longer exists (it was released after being idle); start a new MCP session"


class NodeStream(Protocol):
    """One answer of the node, its body not read yet."""

    status: int
    media_type: str | None
    length: int | None

    def chunks(self) -> AsyncIterator[bytes]: ...


@dataclass(frozen=True)
class NodeAnswer:
    """A node's answer to a JSON call: the status and the parsed body (text when not JSON)."""

    status: int
    body: Any

    @property
    def detail(self) -> str:
        """The error message of an error answer (``detail`` of a JSON object, else the body)."""
        body = self.body
        if isinstance(body, dict) and "detail" in body:
            return str(body["detail"])
        return body if isinstance(body, str) else json.dumps(body)


@dataclass(frozen=True)
class FileData:
    """A workspace file read for an MCP resource."""

    path: str
    media_type: str
    data: bytes


class Sandbox(ABC):
    """A session's node as the MCP layer sees it."""

    def __init__(self) -> None:
        self._restarting = asyncio.Lock()

    @abstractmethod
    def open(
        self, path: str, payload: dict[str, Any] | None, method: str = "POST"
    ) -> AbstractAsyncContextManager[NodeStream]:
        """Send ``payload`` to the node's ``path`` (a GET sends none); raises NodeUnavailable or
        InvalidSession."""

    @abstractmethod
    async def restart(self) -> None:
        """Start the node again after the checker stopped it (workspace kept)."""

    async def post(self, path: str, payload: dict[str, Any] | None = None) -> NodeAnswer:
        """The node's answer; transport failures come back as 503/504 answers with their reason."""
        return await self._restarting_if_stopped(
            lambda: self._post(path, payload), lambda a: a.status == 503 and _stopped(a.detail)
        )

    async def get(self, path: str) -> NodeAnswer:
        """The node's answer to ``GET path``, as :meth:`post` gives it."""
        return await self._post(path, None, "GET")

    async def read_file(self, path: str, limit: int) -> FileData:
        """A workspace file of at most ``limit`` bytes; ResourceError (or ResourceTooLarge) otherwise."""
        result = await self._restarting_if_stopped(
            lambda: self._read_file(path, limit), lambda r: isinstance(r, _StoppedNode)
        )
        if isinstance(result, Exception):
            raise result
        return result

    async def _restarting_if_stopped(
        self, attempt: Callable[[], Awaitable[T]], stopped: Callable[[T], bool]
    ) -> T:
        """``attempt()``; when it finds the node stopped by the checker (idle), start it and try again.

        Concurrent calls restart it once: each tries again under the lock before restarting.
        """
        result = await attempt()
        if not stopped(result):
            return result
        async with self._restarting:
            result = await attempt()
            if not stopped(result):
                return result
            try:
                await self.restart()
            except Exception as exc:
                log.warning("the stopped node did not restart: %s", exc)
                return result
            return await attempt()

    async def _post(self, path: str, payload: dict[str, Any] | None, method: str = "POST") -> NodeAnswer:
        try:
            async with self.open(path, payload, method) as stream:
                raw = await _read(stream, MAX_ANSWER_BYTES)
                if raw is None:
                    return NodeAnswer(
                        502, {"detail": f"the node's answer is larger than {MAX_ANSWER_BYTES} bytes"}
                    )
                return NodeAnswer(stream.status, await _parse(raw, stream.media_type))
        except InvalidSession:
            return NodeAnswer(403, {"detail": GONE})
        except (NodeUnavailable, DatabaseUnavailable) as exc:
            return NodeAnswer(getattr(exc, "status_code", 503), {"detail": str(exc)})

    async def _read_file(self, path: str, limit: int) -> FileData | ResourceError:
        try:
            async with self.open("/download_file", {"file_path": path}) as stream:
                if stream.status != 200:
                    body = await _read(stream, 1 << 20) or b""
                    answer = NodeAnswer(stream.status, await _parse(body, stream.media_type))
                    if answer.status == 503 and _stopped(answer.detail):
                        return _StoppedNode(f"cannot read {path!r}: {answer.detail}")
                    return ResourceError(f"cannot read {path!r}: {answer.detail}")
                if stream.length is not None and stream.length > limit:
                    return _too_large(path, stream.length, limit)
                data = await _read(stream, limit)
                if data is None:
                    return _too_large(path, None, limit)
        except InvalidSession:
            return ResourceError(GONE)
        except (NodeUnavailable, DatabaseUnavailable) as exc:
            kind = _StoppedNode if _stopped(str(exc)) else ResourceError
            return kind(f"cannot read {path!r}: {exc}")
        media = mimetypes.guess_type(path)[0] or "application/octet-stream"
        return FileData(path, media, data)


class _StoppedNode(ResourceError):
    """The read found the node stopped (it is restarted and the read tried again)."""


def _stopped(detail: str) -> bool:
    return _STOPPED.match(detail) is not None


def _too_large(path: str, size: int | None, limit: int) -> ResourceTooLarge:
    what = f"{size} bytes" if size is not None else "more than that"
    return ResourceTooLarge(
        f"{path!r} is {what}, above the {limit}-byte limit for MCP resources (mcp.resource_max_bytes); "
        "read part of it with a tool (FileSystemEnv_read_from_file, shell_command_executor) or download "
        "it with `toolserver download`"
    )


async def _read(stream: NodeStream, limit: int) -> bytes | None:
    """The whole body, or None as soon as it grows past ``limit`` bytes."""
    parts, size = [], 0
    async for chunk in stream.chunks():
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


async def _parse(raw: bytes, media_type: str | None) -> Any:
    if media_type is not None and "json" not in media_type:
        return raw.decode("utf-8", errors="replace")
    try:
        return json.loads(raw) if len(raw) < 1 << 20 else await asyncio.to_thread(json.loads, raw)
    except ValueError:
        return raw.decode("utf-8", errors="replace")
