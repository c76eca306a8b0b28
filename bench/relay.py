"""A bare byte relay on uvloop: the floor under any proxy written in Python (``bench/proxy.py``).

It parses nothing. Each client connection gets a connection of its own to the upstream, and bytes
are copied both ways as they arrive, from protocol callbacks (no coroutine per chunk). A Python
HTTP proxy does strictly more per request (parse the request, find the route, rewrite headers,
parse the answer), so on the same machine its throughput is at most this relay's: the relay's
figure against nginx's says how close to nginx Python can come at all.

``python -m bench.relay HOST:PORT`` listens on a free 127.0.0.1 port and prints it.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench.procs import end, register_root, spawn
from toolserver.testing import free_port


def _no_delay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Upstream(asyncio.Protocol):
    def __init__(self, client: asyncio.Transport) -> None:
        self.client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _no_delay(transport)

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class _Client(asyncio.Protocol):
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.transport: asyncio.Transport | None = None
        self.peer: asyncio.Transport | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport
        _no_delay(transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        assert self.transport is not None
        client = self.transport
        try:
            peer, _ = await asyncio.get_running_loop().create_connection(
                lambda: _Upstream(client), self.host, self.port
            )
        except OSError:
            client.close()
            return
        self.peer = peer
        for chunk in self.early:
            peer.write(chunk)
        self.early.clear()

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.early.append(data)
        else:
            self.peer.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None:
            self.peer.close()


async def _serve(upstream: str, port: int) -> None:
    host, _, upstream_port = upstream.rpartition(":")
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Client(host, int(upstream_port)), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


class Relay:
    """``with Relay(root, "127.0.0.1:1234") as relay: relay.port`` (a subprocess)."""

    def __init__(self, root: Path, upstream: str) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        register_root(root)
        self.upstream = upstream
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Relay:
        argv = [sys.executable, "-m", "bench.relay", self.upstream, str(self.port)]
        self.proc = spawn(argv, self.root / "relay.log")
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.root / "relay.log").read_text(errors="replace")[-1000:]
                raise RuntimeError(f"the relay did not start: {log}")
            time.sleep(0.02)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            end(self.proc, timeout=10)


if __name__ == "__main__":
    import uvloop

    uvloop.run(_serve(sys.argv[1], int(sys.argv[2])))
