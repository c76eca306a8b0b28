"""The proxy's client to nodes (:mod:`toolserver.manager.upstream`) against a real HTTP server on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from toolserver.errors import NodeConnectionError
from toolserver.manager.upstream import UpstreamPool

pytestmark = pytest.mark.asyncio


class Server:
    """A small HTTP/1.1 server: answers ``ok`` with keep-alive, and can drop a kept-alive connection
    on its next request without answering (as a node does whose keep-alive ran out as it arrived)."""

    def __init__(self, drop_second: bool = False, body: bytes = b"ok") -> None:
        self.drop_second = drop_second
        self.body = body
        self.connections = 0
        self.requests: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                served += 1
                if self.drop_second and served == 2:
                    return  # closed without an answer
                self.requests.append(head)
                length = b"content-length: %d\r\n" % len(self.body)
                writer.write(b"HTTP/1.1 200 OK\r\n" + length + b"\r\n" + self.body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()


def _head(port: int, path: str = "/x") -> bytes:
    return f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-length: 2\r\n\r\n".encode()


async def _call(pool: UpstreamPool, port: int, body: bytes | AsyncIterator[bytes] | None = b"hi") -> bytes:
    answer = await pool.request("127.0.0.1", port, _head(port), body, chunked=False)
    try:
        assert answer.status == 200
        return await answer.read()
    finally:
        answer.release()


async def test_requests_share_one_kept_alive_connection() -> None:
    server = Server()
    pool = UpstreamPool(read_timeout=5)
    async with server as port:
        answers = [await _call(pool, port) for _ in range(5)]
    await pool.aclose()
    assert answers == [b"ok"] * 5
    assert server.connections == 1


async def test_a_kept_alive_connection_closed_by_the_node_is_retried_on_a_new_one() -> None:
    server = Server(drop_second=True)
    pool = UpstreamPool(read_timeout=5)
    async with server as port:
        first = await _call(pool, port)
        second = await _call(pool, port)  # sent on the kept connection, which the server drops
    await pool.aclose()
    assert (first, second) == (b"ok", b"ok")
    assert server.connections == 2
    assert len(server.requests) == 2


async def test_a_streamed_body_is_not_sent_twice() -> None:
    server = Server(drop_second=True)
    pool = UpstreamPool(read_timeout=5)

    async def body() -> AsyncIterator[bytes]:
        yield b"hi"

    async with server as port:
        await _call(pool, port)
        with pytest.raises(NodeConnectionError):
            await _call(pool, port, body())
    await pool.aclose()
    assert server.connections == 1


async def test_a_node_that_does_not_answer_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 16)
        await asyncio.sleep(5)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = UpstreamPool(read_timeout=0.2)
    with pytest.raises(TimeoutError):
        await _call(pool, port)
    server.close()
    await pool.aclose()


async def test_a_refused_connection_is_a_node_connection_error() -> None:
    from toolserver.testing import free_port

    pool = UpstreamPool(read_timeout=1)
    with pytest.raises(NodeConnectionError, match="cannot connect"):
        await _call(pool, free_port())
