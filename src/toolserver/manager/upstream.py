"""Dialling nodes: the one place that turns a node's address into a connection.

A node's address is ``host:port`` over TCP, or, for a node in a network namespace of its own (the
``sandbox`` tier), ``host = "unix:<socket path>"`` with ``port = 0``. :class:`NodeConnector` is the
aiohttp connector of the manager's pooled client (HTTP proxy, WebSocket proxy, MCP endpoint): it
dials TCP as aiohttp does, and a Unix socket for a URL made by :func:`node_url` from a Unix
address. Connections are pooled per node either way.
"""

from __future__ import annotations

import hashlib
from typing import Any

import aiohttp
from aiohttp.client_exceptions import UnixClientConnectorError
from aiohttp.helpers import ceil_timeout

from toolserver.runtimes.base import UNIX_PREFIX


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
