"""Benchmark: the manager's upstream connection to a node, over a Unix socket against TCP.

The ``sandbox`` tier's nodes serve on a Unix socket; the others on 127.0.0.1. Two ``toolserver
node`` processes, one serving on an inherited TCP socket and one on an inherited Unix socket, are
driven through the manager's own connector (``toolserver.manager.upstream.NodeConnector``, one
pooled aiohttp client, as the proxy holds it) with ``execute_tool`` of ``calculator("6*7")``, one
request at a time. The two alternate in batches of 25 requests, in alternating order, so that load
from elsewhere on the machine falls on both alike. The figure is the Unix socket's p50 against
TCP's; the target is at most 10% slower.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import Context, Figure, Outcome, at_most
from bench.procs import end, register_root, spawn
from toolserver.manager.upstream import NodeConnector, node_url

NAME = "upstream"
TITLE = "Upstream: Unix socket vs TCP"
BATCH = 25
BODY = {"tool_name": "calculator", "arguments": {"expression": "6*7"}}
SECRET = "bench-secret"
SLOWER_AT_MOST = 0.10


def _node(root: Path, sock: socket.socket) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOOLSERVER_")}
    env["TOOLSERVER_NODE_SECRET"] = SECRET
    argv = [sys.executable, "-m", "toolserver", "node", "--fd", str(sock.fileno())]
    argv += ["--workspace", str(root / "workspace")]
    return spawn(argv, root / "node.log", env=env, cwd=root, pass_fds=(sock.fileno(),))


async def _measure(addresses: dict[str, tuple[str, int]], rounds: int) -> dict[str, list[float]]:
    latencies: dict[str, list[float]] = {name: [] for name in addresses}
    async with aiohttp.ClientSession(connector=NodeConnector()) as client:
        deadline = time.monotonic() + 60
        for name, (host, port) in addresses.items():
            while True:
                try:
                    async with client.get(node_url(client, host, port, "/health")) as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the {name} node did not start")
                await asyncio.sleep(0.05)
        headers = {"X-ToolServer-Node-Secret": SECRET}
        for i in range(rounds):
            order = list(addresses.items())
            for name, (host, port) in order if i % 2 else reversed(order):
                url = node_url(client, host, port, "/execute_tool")
                for _ in range(BATCH):
                    t0 = time.perf_counter()
                    async with client.post(url, json=BODY, headers=headers) as resp:
                        await resp.read()
                        if resp.status != 200:
                            raise RuntimeError(f"{name}: {resp.status}")
                    latencies[name].append((time.perf_counter() - t0) * 1000)
    return latencies


def run(ctx: Context) -> Outcome:
    outcome = Outcome(NAME, TITLE, method=__doc__ or "")
    root = ctx.workdir / "upstream"
    root.mkdir(parents=True, exist_ok=True)
    register_root(root)
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    path = root / "node.sock"
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(path))
    procs = []
    try:
        for name, sock in (("tcp", tcp), ("unix", unix)):
            (root / name).mkdir(exist_ok=True)
            procs.append(_node(root / name, sock))
        addresses = {"tcp": ("127.0.0.1", tcp.getsockname()[1]), "unix": (f"unix:{path}", 0)}
        lat = asyncio.run(_measure(addresses, ctx.pick(80, 20)))
    finally:
        for proc in procs:
            end(proc)
        tcp.close()
        unix.close()
    p50 = {name: statistics.median(values) for name, values in lat.items()}
    slower = (p50["unix"] - p50["tcp"]) / p50["tcp"]
    outcome.raw.update(latency_ms=lat, p50_ms=p50)
    outcome.add(
        Figure(
            NAME,
            "execute_tool over a Unix socket vs TCP, p50 (slower by)",
            100 * slower,
            "%",
            f"TCP p50 {p50['tcp']:.3f} ms, Unix socket p50 {p50['unix']:.3f} ms (n = {len(lat['unix'])})",
            f"≤ {100 * SLOWER_AT_MOST:g}%",
            at_most(slower, SLOWER_AT_MOST),
        )
    )
    return outcome
