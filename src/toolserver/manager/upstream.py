"""The proxy's HTTP/1.1 client to nodes: keep-alive connections per node address, httptools parsing.

A general client (aiohttp's) spends most of a small tool call's proxy time on per-request objects:
a URL, header multidicts, a request and a response object, tracing hooks. Here a request is one
``bytes`` head written with its (small) body in a single write, and the answer is parsed by
httptools straight into a list of raw headers and a queue of body chunks.

* Connections are kept per ``(host, port)`` and reused; one idle longer than
  :data:`IDLE_SECONDS` (below the node server's 5 s keep-alive) is closed instead of reused. A
  reused connection that the node closed as the request went out (nothing of an answer came back)
  is retried once on a new connection, when the body was small and so can be sent again.
* Every wait for the node (the answer's head, each later chunk) is bounded by ``read_timeout``
  (TimeoutError); connecting by ``connect_timeout``.
* Flow control both ways: a streamed request body waits while the node's socket is full, and
  reading from the node pauses while more than :data:`HIGH_WATER` bytes of answer wait unsent.
* Every connection is made by :func:`open_connection`, the one place that knows how to reach a node:
  ``host:port`` over TCP, or, for a node in a network namespace of its own (the ``sandbox`` tier),
  ``host = "unix:<socket path>"`` with ``port = 0``, over that Unix socket.

WebSockets and MCP calls go through aiohttp; its connector :class:`NodeConnector` dials the same
two kinds of address (URLs from :func:`node_url`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httptools
from aiohttp.client_exceptions import UnixClientConnectorError
from aiohttp.helpers import ceil_timeout

from toolserver.errors import NodeConnectionError
from toolserver.runtimes.base import UNIX_PREFIX

#: Idle connections older than this are not reused (uvicorn, the node's server, closes them at 5 s).
IDLE_SECONDS = 4.0
#: Idle connections kept per node address.
MAX_IDLE_PER_NODE = 32
#: Answer bytes queued before reading from the node pauses; it resumes below LOW_WATER.
HIGH_WATER = 1 << 20
LOW_WATER = HIGH_WATER // 4
#: Largest piece handed out by :meth:`Answer.chunks` (queued pieces are joined up to this).
JOIN_BYTES = 256 * 1024

Headers = list[tuple[bytes, bytes]]


class _Connection(asyncio.Protocol):
    """One connection to a node, carrying one exchange at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.drained: asyncio.Future[None] | None = None
        self.write_paused = self.read_paused = False
        self.idle_since = 0.0
        self.reset()

    def reset(self) -> None:
        """Ready for the next exchange."""
        self.status = 0
        self.headers: Headers = []
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.head_done = self.complete = self.answered = False
        self.keep_alive = True
        #: False once the request's body may not all have reached the node (never reused then)
        self.body_sent = True
        self._informational = False

    # ---- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete and self.error is None:
            reason = f": {exc}" if exc else ""
            self.error = NodeConnectionError(f"the node closed the connection{reason}")
        self._wake()
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.answered = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = NodeConnectionError(f"the node sent an invalid HTTP answer: {exc}")
            self.keep_alive = False
            self.abort()
        self._wake()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    # ---- httptools callbacks ------------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # 100 Continue and the like: the real answer follows
            self._informational = True
            self.headers = []
            return
        self.status = status
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self.keep_alive = self.parser.should_keep_alive()
        self.complete = True

    # ---- use ----------------------------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, seconds: float) -> None:
        """Until the next bytes, the end or an error arrive; TimeoutError after ``seconds``."""
        waiter = self.waiter = self.loop.create_future()
        timer = self.loop.call_later(seconds, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self.waiter = None

    async def drain(self) -> None:
        if self.write_paused and not self.closed:
            self.drained = self.loop.create_future()
            await self.drained
        if self.closed:
            raise self.error or NodeConnectionError("the node closed the connection")

    def take(self) -> bytes:
        """Every queued answer byte (up to JOIN_BYTES), reading resumed once the queue is short."""
        chunks = self.chunks
        chunk = chunks.popleft()
        while chunks and len(chunk) + len(chunks[0]) <= JOIN_BYTES:
            chunk += chunks.popleft()
        self.buffered -= len(chunk)
        if self.read_paused and self.buffered < LOW_WATER and self.transport is not None:
            self.read_paused = False
            self.transport.resume_reading()
        return chunk

    def abort(self) -> None:
        self.keep_alive = False
        if self.transport is not None and not self.closed:
            self.transport.abort()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


async def open_connection(host: str, port: int, connect_seconds: float) -> _Connection:
    """A new connection to the node at ``host:port`` (the one place that dials a node)."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(connect_seconds):
            if host.startswith(UNIX_PREFIX):
                path = host[len(UNIX_PREFIX) :]
                _, conn = await loop.create_unix_connection(lambda: _Connection(loop), path)
            else:
                _, conn = await loop.create_connection(lambda: _Connection(loop), host, port)
    except OSError as exc:
        raise NodeConnectionError(f"cannot connect to the node: {exc.strerror or exc}") from None
    return conn


def host_header(host: str, port: int) -> bytes:
    """The ``Host`` header of a request to the node at ``host``/``port`` (``localhost`` for a socket)."""
    return b"localhost" if host.startswith(UNIX_PREFIX) else b"%b:%d" % (host.encode(), port)


class Answer:
    """A node's answer: status and raw headers at once, the body read whole or chunk by chunk.

    :meth:`release` (always, in a ``finally``) puts the connection back for the next request when
    the answer was read to its end, else closes it.
    """

    def __init__(self, pool: UpstreamPool, key: tuple[str, int], conn: _Connection) -> None:
        self._pool, self._key, self._conn = pool, key, conn
        self.status = conn.status
        self.raw_headers = conn.headers
        self.content_length: int | None = None
        for name, value in conn.headers:
            if len(name) == 14 and name.lower() == b"content-length":
                self.content_length = int(value) if value.isdigit() else None
        self._released = False

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    async def chunks(self) -> AsyncIterator[bytes]:
        conn, timeout = self._conn, self._pool.read_timeout
        while True:
            if conn.chunks:
                yield conn.take()
            elif conn.complete:
                return
            elif conn.error is not None:
                raise conn.error
            else:
                await conn.wait(timeout)

    def close(self) -> None:
        """Drop the connection now (the node sees its client go)."""
        self._conn.abort()
        self._conn._wake()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._pool.put_back(self._key, self._conn)


class UpstreamPool:
    """Keep-alive connections to nodes, at most ``max_connections`` in use at once."""

    def __init__(self, read_timeout: float, connect_timeout: float = 5.0, max_connections: int = 512) -> None:
        self.read_timeout = read_timeout
        self.connect_timeout = connect_timeout
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._slots = asyncio.Semaphore(max_connections)
        self._swept = time.monotonic()

    def _reusable(self, key: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < IDLE_SECONDS:
                return conn
            conn.abort()
        return None

    def put_back(self, key: tuple[str, int], conn: _Connection) -> None:
        self._slots.release()
        if not (conn.complete and conn.keep_alive and conn.body_sent) or conn.closed or conn.chunks:
            conn.abort()
            return
        idle = self._idle.setdefault(key, [])
        if len(idle) >= MAX_IDLE_PER_NODE:
            conn.abort()
            return
        conn.reset()
        conn.idle_since = now = time.monotonic()
        idle.append(conn)
        if now - self._swept > IDLE_SECONDS:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        """Close idle connections too old to reuse, and forget nodes left without any (released ones)."""
        self._swept = now
        for key, idle in list(self._idle.items()):
            keep = [c for c in idle if not c.closed and now - c.idle_since < IDLE_SECONDS]
            for conn in idle:
                if conn not in keep:
                    conn.abort()
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]

    def forget(self, host: str, port: int) -> None:
        """Close the idle connections to a node (it stopped, or stopped answering)."""
        for conn in self._idle.pop((host, port), []):
            conn.abort()

    async def request(
        self, host: str, port: int, head: bytes, body: bytes | AsyncIterator[bytes] | None, chunked: bool
    ) -> Answer:
        """Send ``head`` (a complete request head) and ``body``; returns once the answer's head is in.

        A streamed ``body`` is sent as it comes, framed as chunks when ``chunked``. Raises
        NodeConnectionError or TimeoutError; a cancelled call closes its connection.
        """
        key = (host, port)
        await self._slots.acquire()
        try:
            for attempt in (0, 1):
                conn = self._reusable(key)
                reused = conn is not None
                if conn is None:
                    conn = await open_connection(host, port, self.connect_timeout)
                try:
                    if body is None or isinstance(body, bytes):
                        await self._exchange(conn, head + body if body else head)
                    else:
                        await self._exchange_streamed(conn, head, body, chunked)
                except NodeConnectionError:
                    conn.abort()
                    replayable = body is None or isinstance(body, bytes)
                    if attempt == 0 and reused and replayable and not conn.answered:
                        continue  # the node closed an idle connection as the request went out
                    raise
                except BaseException:
                    conn.abort()  # cancelled or timed out: the node must see the request go
                    raise
                return Answer(self, key, conn)
        except BaseException:
            self._slots.release()
            raise
        raise AssertionError("unreachable")

    async def _exchange(self, conn: _Connection, data: bytes) -> None:
        assert conn.transport is not None
        if conn.closed:
            raise conn.error or NodeConnectionError("the node closed the connection")
        if data:
            conn.transport.write(data)
        while not conn.head_done:
            if conn.error is not None:
                raise conn.error
            await conn.wait(self.read_timeout)

    async def _exchange_streamed(
        self, conn: _Connection, head: bytes, body: AsyncIterator[bytes], chunked: bool
    ) -> None:
        writer = asyncio.ensure_future(self._write_body(conn, head, body, chunked))
        reader = asyncio.ensure_future(self._exchange(conn, b""))
        try:
            await asyncio.wait((writer, reader), return_when=asyncio.FIRST_COMPLETED)
            if writer.done() and writer.exception() is not None:
                raise writer.exception()  # type: ignore[misc]  # the client went away mid-upload, say
            await reader
            # the node answered before taking the whole body (413, 507, say): the rest of it, or
            # the node's reading of it, would be taken for the next request on this connection
            transport = conn.transport
            unsent = transport is not None and transport.get_write_buffer_size() > 0
            if not writer.done() or unsent or conn.status >= 400:
                conn.body_sent = False
        finally:
            for task in (writer, reader):
                task.cancel()

    async def _write_body(
        self, conn: _Connection, head: bytes, body: AsyncIterator[bytes], chunked: bool
    ) -> None:
        assert conn.transport is not None
        conn.transport.write(head)
        async for chunk in body:
            if conn.closed:
                raise conn.error or NodeConnectionError("the node closed the connection")
            conn.transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
            await conn.drain()
        if chunked:
            conn.transport.write(b"0\r\n\r\n")

    async def aclose(self) -> None:
        for key in list(self._idle):
            self.forget(*key)


class NodeConnector(aiohttp.TCPConnector):
    """A TCPConnector that also dials the Unix sockets of nodes (see :meth:`base`)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: host name in URLs → socket path
        self._sockets: dict[str, str] = {}
        #: node address → URL base
        self._bases: dict[tuple[str, int], str] = {}

    def base(self, host: str, port: int) -> str:
        """``http://host:port`` of a node; for ``unix:PATH`` a URL whose host name stands for PATH."""
        found = self._bases.get((host, port))
        if found is not None:
            return found
        if host.startswith(UNIX_PREFIX):
            path = host[len(UNIX_PREFIX) :]
            name = hashlib.blake2s(path.encode(), digest_size=10).hexdigest() + ".node.invalid"
            self._sockets[name] = path
            found = f"http://{name}"
        else:
            found = f"http://{host}:{port}"
        if len(self._bases) > 65536:  # nodes come and go: keep the maps bounded
            self._bases.clear()
            self._sockets.clear()
            if host.startswith(UNIX_PREFIX):
                self._sockets[found[len("http://") :]] = host[len(UNIX_PREFIX) :]
        self._bases[(host, port)] = found
        return found

    async def _create_connection(
        self,
        req: Any,
        traces: Any,
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 - aiohttp's signature
    ) -> Any:
        path = self._sockets.get(req.host) if self._sockets else None
        if path is None:
            return await super()._create_connection(req, traces, timeout)
        try:
            async with ceil_timeout(timeout.sock_connect, ceil_threshold=timeout.ceil_threshold):
                _, proto = await self._loop.create_unix_connection(self._factory, path)
        except OSError as exc:
            if exc.errno is None and isinstance(exc, TimeoutError):
                raise
            raise UnixClientConnectorError(path, req.connection_key, exc) from exc
        return proto


def node_url(client: aiohttp.ClientSession, host: str, port: int, path: str) -> str:
    """The URL of ``path`` on the node at ``host``/``port`` for ``client`` (whose connector is a
    :class:`NodeConnector`)."""
    connector = client.connector
    if isinstance(connector, NodeConnector):
        return connector.base(host, port) + path
    return f"http://{host}:{port}{path}"
