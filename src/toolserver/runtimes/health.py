"""The one ``GET /health`` that local runtimes send their nodes: a bare HTTP/1.1 request on a new
connection (TCP or Unix socket), the status line read and the connection closed. An HTTP client
library costs several times the CPU per probe, which adds up over many idle nodes."""

from __future__ import annotations

import asyncio

from toolserver.runtimes.base import UNIX_PREFIX

#: seconds a node has to answer a probe
HEALTH_TIMEOUT = 1.0


async def node_healthy(host: str, port: int) -> bool:
    """True when the node at ``host:port`` (or ``unix:<path>``) answers ``/health`` with 200 in time."""
    writer = None
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT):
            if host.startswith(UNIX_PREFIX):
                reader, writer = await asyncio.open_unix_connection(host.removeprefix(UNIX_PREFIX))
            else:
                reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /health HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")
            line = await reader.readline()
            return line.split(b" ", 2)[1:2] == [b"200"]
    except (OSError, TimeoutError, IndexError):
        return False
    finally:
        if writer is not None:
            writer.close()


async def unix_health(path: str) -> bool:
    """:func:`node_healthy` of the node on Unix socket ``path``."""
    return await node_healthy(UNIX_PREFIX + path, 0)


__all__ = ["HEALTH_TIMEOUT", "node_healthy", "unix_health"]
