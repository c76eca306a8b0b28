"""A real manager (process nodes, SQLite, a warm pool of one) shared by the MCP tests, and the
two ways the official SDK's client reaches it: Streamable HTTP at ``/mcp`` and ``toolserver mcp``
on stdio."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from mcp import Client, StdioServerParameters

from tests.support import ManagerProcess, wait_until

#: A notebook cell that displays a small PNG it draws by hand (a plot without matplotlib).
PNG_CELL = r"""
import struct, zlib
from IPython.display import Image, display
w, h = 16, 16
rows = b"".join(b"\x00" + b"".join(bytes((x * 16, y * 16, 160)) for x in range(w)) for y in range(h))
def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
       + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
display(Image(data=png))
print("plotted")
"""


def session_nodes(manager: ManagerProcess) -> list[Any]:
    """Node records that belong to a session (the warm pool's are not)."""
    return manager.query("SELECT * FROM toolserver_nodes WHERE NOT pooled")


def assert_nothing_leaked(manager: ManagerProcess) -> None:
    """Every session's node is released: no record, no process beyond the warm pool's."""
    wait_until(lambda: not session_nodes(manager), timeout=30, what="session nodes released")
    pooled = manager.query("SELECT id FROM toolserver_nodes WHERE pooled")
    wait_until(
        lambda: len(manager.node_processes()) <= len(pooled), timeout=30, what="session node processes gone"
    )


@pytest.fixture(scope="package")
def mcp_manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagerProcess]:
    manager = ManagerProcess(tmp_path_factory.mktemp("mcp") / "manager", node={"warm_pool_size": 1})
    manager.start()
    try:
        yield manager
    finally:
        leftovers = manager.cleanup()
        assert not leftovers, f"processes left running: {leftovers}"


def mcp_client(manager: ManagerProcess, transport: str, *extra: str) -> Client:
    """An SDK client of ``manager`` over ``transport`` (``http`` or ``stdio``)."""
    if transport == "http":
        return Client(manager.url + "/mcp")
    argv = ["-m", "toolserver", "mcp", "--url", manager.url, *extra]
    return Client(StdioServerParameters(command=sys.executable, args=argv, cwd=str(manager.root)))


@pytest.fixture(params=["http", "stdio"])
def connect(request: pytest.FixtureRequest, mcp_manager: ManagerProcess) -> Iterator[Callable[[], Client]]:
    """Opens SDK clients over one transport; afterwards every session's node must be released."""
    yield lambda: mcp_client(mcp_manager, request.param)
    assert_nothing_leaked(mcp_manager)


def png_signature(data: bytes) -> bool:
    return data.startswith(b"\x89PNG\r\n\x1a\n")


__all__ = ["PNG_CELL", "assert_nothing_leaked", "mcp_client", "png_signature", "session_nodes"]
