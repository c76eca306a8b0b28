"""The one ``GET /health`` that local runtimes send their nodes: a bare HTTP/1.1 request on a new
connection (TCP or Unix socket), the status line read and the connection closed. An HTTP client
library costs several times the CPU per probe, which adds up over many idle nodes."""

from __future__ import annotations

import asyncio
import random
import time

from toolserver.runtimes.base import HEALTHY, UNIX_PREFIX, NodeInfo

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


class ProbePacer:
    """Which running nodes a ``list()`` asks for /health: a node healthy at its last probe is taken
    as healthy until its next probe is due, ``every`` seconds later spread by a random quarter (a
    thousand nodes started together are not asked in the same tick); any other node is asked at
    once. ``every`` 0 asks every node every time. Whether a node still runs is the runtime's to
    see on every list."""

    def __init__(self, every: float) -> None:
        self.every = every
        self._next: dict[str, float] = {}

    def due(self, running: list[NodeInfo], healthy_once: set[str]) -> list[NodeInfo]:
        """The nodes of ``running`` to ask now; the others are marked healthy."""
        now = time.monotonic()
        asked = []
        for info in running:
            if self.every and info.node_id in healthy_once and self._next.get(info.node_id, 0) > now:
                info.health = HEALTHY
            else:
                asked.append(info)
        return asked

    def asked(self, infos: list[NodeInfo]) -> None:
        """Record the answers of the nodes just asked: a healthy one is next due ``every`` on."""
        now = time.monotonic()
        for info in infos:
            if info.health == HEALTHY:
                self._next[info.node_id] = now + self.every * random.uniform(0.75, 1.25)
            else:
                self._next.pop(info.node_id, None)

    def forget(self, node_id: str) -> None:
        self._next.pop(node_id, None)


__all__ = ["HEALTH_TIMEOUT", "ProbePacer", "node_healthy"]
