"""Benchmark: streamed command output, time from the process printing a line to the client reading it.

One real manager subprocess (process runtime) and one session. Each round starts a command with
``POST /commands`` that sleeps 0.2 s (so the stream is open and idle) and then prints bash's
``$EPOCHREALTIME`` (the wall clock at the moment ``echo`` writes); the client, an httpx stream in
this process reading the NDJSON lines as they come, takes the wall clock when the stdout event
arrives. The difference is the first-byte delay of that chunk: the node reading the pipe, its
HTTP stream, and (through the manager) the proxy. Rounds alternate between the node directly (its
port and secret: the reference) and the manager (the session cookie), in the same run.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

from bench.common import Context, Figure, Outcome, at_most, node_address, percentile
from bench.procs import Manager

NAME = "first_byte"
TITLE = "Streamed output, first byte"
TARGET_MS = 50.0
COMMAND = "sleep 0.2; echo $EPOCHREALTIME"


def one_round(http: httpx.Client, url: str, headers: dict[str, str]) -> float:
    """Milliseconds from the command printing to this client reading the line."""
    with http.stream("POST", url, json={"command": COMMAND}, headers=headers) as response:
        if response.status_code != 200:
            response.read()
            raise RuntimeError(f"POST /commands answered {response.status_code}: {response.text}")
        for line in response.iter_lines():
            event = json.loads(line)
            if event["type"] == "stdout":
                return (time.time() - float(event["data"])) * 1000.0
    raise RuntimeError("the stream ended without the command's output")


def run(ctx: Context) -> Outcome:
    outcome = Outcome(NAME, TITLE, method=__doc__ or "")
    rounds = ctx.pick(60, 12)
    with Manager(ctx.workdir / "first-byte") as manager, httpx.Client(trust_env=False, timeout=60) as http:
        cookie = http.post(manager.url + "/get_cookie").cookies["node_id"]
        record = manager.node(cookie)
        base_url, unix_socket = node_address(record)  # a sandboxed node: its Unix socket
        transport = httpx.HTTPTransport(uds=unix_socket) if unix_socket else None
        with httpx.Client(trust_env=False, timeout=60, transport=transport) as to_node:
            targets: dict[str, tuple[httpx.Client, str, dict[str, str]]] = {
                "direct": (to_node, base_url + "/commands", {"X-ToolServer-Node-Secret": record["secret"]}),
                "manager": (http, manager.url + "/commands", {"Cookie": f"node_id={cookie}"}),
            }
            samples: dict[str, list[float]] = {name: [] for name in targets}
            for client, url, headers in targets.values():  # warm up connections and the node's shell
                one_round(client, url, headers)
            for _ in range(rounds):
                for name, (client, url, headers) in targets.items():
                    samples[name].append(one_round(client, url, headers))
    stats: dict[str, Any] = {
        name: {"p50": percentile(v, 50), "p99": percentile(v, 99), "max": max(v), "n": len(v)}
        for name, v in samples.items()
    }
    outcome.raw.update(samples=samples, stats=stats, command=COMMAND)
    via, direct = stats["manager"], stats["direct"]
    outcome.add(
        Figure(
            NAME,
            f"first byte after the process prints, through the manager p50 (n = {via['n']})",
            via["p50"],
            "ms",
            f"node directly p50 {direct['p50']:.2f} ms",
            f"≤ {TARGET_MS:g} ms",
            at_most(via["p50"], TARGET_MS),
        ),
        Figure(
            NAME,
            "first byte after the process prints, through the manager p99",
            via["p99"],
            "ms",
            f"node directly p99 {direct['p99']:.2f} ms",
            f"≤ {TARGET_MS:g} ms",
            at_most(via["p99"], TARGET_MS),
        ),
    )
    return outcome
