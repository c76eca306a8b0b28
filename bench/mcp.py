"""Benchmark: MCP ``tools/call`` latency through ``/mcp``, next to the same call through ``/execute_tool``.

One real manager subprocess (process runtime, ``--log-level warning``) serves two sessions on
two nodes: an MCP session opened with ``initialize`` at ``/mcp`` (Streamable HTTP with one JSON
answer per request, ``mcp.json_response``'s default), and an XAgent-style session from ``/get_cookie``. Both
run ``calculator("6*7")``: a JSON-RPC ``tools/call`` POST with the session's ``Mcp-Session-Id``,
and the same call as ``POST /execute_tool`` with the cookie. The load generator (``bench.loadgen``,
its own process, closed loop on a keep-alive connection) measures each at concurrency 1 (it sends
one fixed request, and JSON-RPC ids must not repeat among calls in flight), in alternating order
over two rounds (one in ``--quick``). *Added latency* is the MCP percentile
minus the ``/execute_tool`` one: what the MCP layer (the SDK's session manager, JSON-RPC, the
result mapping) costs on top of the proxy.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from bench.common import Context, Figure, Outcome, at_most
from bench.loadgen import build_request, compare
from bench.procs import Manager

NAME = "mcp"
TITLE = "MCP tools/call"
TARGETS = ("execute_tool", "mcp")
ADDED_P50_MS = 1.0
PROTOCOL = "2025-11-25"
ACCEPT = "application/json, text/event-stream"
CALL = {"tool_name": "calculator", "arguments": {"expression": "6*7"}}
RPC_CALL = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "tools/call",
    "params": {"name": "calculator", "arguments": {"expression": "6*7"}},
}


def _open_mcp_session(http: httpx.Client) -> str:
    init = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {
            "protocolVersion": PROTOCOL,
            "capabilities": {},
            "clientInfo": {"name": "bench", "version": "0"},
        },
    }
    resp = http.post("/mcp", json=init, headers={"Accept": ACCEPT})
    resp.raise_for_status()
    sid = resp.headers["mcp-session-id"]
    note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    http.post("/mcp", json=note, headers=_mcp_headers(sid)).raise_for_status()
    return sid


def _mcp_headers(sid: str) -> dict[str, str]:
    return {"Accept": ACCEPT, "Mcp-Session-Id": sid, "MCP-Protocol-Version": PROTOCOL}


def _check(http: httpx.Client, requests: dict[str, tuple[str, dict[str, Any], dict[str, str]]]) -> None:
    """One call per target through httpx: both must answer 42."""
    for target, (path, payload, headers) in requests.items():
        resp = http.post(path, json=payload, headers=headers)
        ok = resp.status_code == 200 and (
            '"text":"42"' in resp.text.replace(" ", "") if target == "mcp" else resp.text.strip() == "42"
        )
        if not ok:
            raise RuntimeError(f"{target} answered {resp.status_code}: {resp.text[:300]}")


def _measure(
    port: int, requests: dict[str, tuple[str, dict[str, Any], dict[str, str]]], ctx: Context
) -> dict:
    """{concurrency: {target: {latency_ms, rps, rps_mean, errors}}}."""
    specs = {}
    for target, (path, payload, headers) in requests.items():
        body = json.dumps(payload, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", **headers}
        specs[target] = {
            "host": "127.0.0.1",
            "port": port,
            "request": build_request("POST", path, "127.0.0.1", port, body, headers).decode("latin-1"),
            "concurrency": 1,
            "requests": ctx.pick(3000, 500),
            "duration": ctx.pick(8, 3),
            "warmup": 100,
        }
    return {"1": compare(specs, ctx.pick(2, 1))}


def _figures(results: dict[str, Any]) -> list[Figure]:
    rows = []
    for conc, cell in results.items():
        lat = {t: cell[t]["latency_ms"] for t in TARGETS}
        for pct in ("p50", "p99"):
            added = lat["mcp"][pct] - lat["execute_tool"][pct]
            has_target = pct == "p50" and conc == "1"
            rows.append(
                Figure(
                    NAME,
                    f"calculator, c={conc}: MCP tools/call added latency {pct}",
                    added,
                    "ms",
                    f"/execute_tool {lat['execute_tool'][pct]:.3f} ms, MCP {lat['mcp'][pct]:.3f} ms",
                    f"≤ {ADDED_P50_MS:g} ms" if has_target else "",
                    at_most(added, ADDED_P50_MS) if has_target else None,
                )
            )
        rps = {t: cell[t]["rps_mean"] for t in TARGETS}
        rows.append(
            Figure(
                NAME,
                f"calculator, c={conc}: MCP tools/call per second",
                rps["mcp"],
                "req/s",
                f"/execute_tool {rps['execute_tool']:,.0f} req/s",
                note=f"errors: MCP {cell['mcp']['errors']}, /execute_tool {cell['execute_tool']['errors']}",
            )
        )
    return rows


def run(ctx: Context) -> Outcome:
    outcome = Outcome(NAME, TITLE, method=__doc__ or "")
    root = ctx.workdir / "mcp" / "manager"
    with (
        Manager(root, node={"health_check_interval": 1.0}) as manager,
        httpx.Client(base_url=manager.url, trust_env=False, timeout=120) as http,
    ):
        cookie = http.post("/get_cookie").cookies["node_id"]
        sid = _open_mcp_session(http)
        requests = {
            "execute_tool": ("/execute_tool", CALL, {"Cookie": f"node_id={cookie}"}),
            "mcp": ("/mcp", RPC_CALL, _mcp_headers(sid)),
        }
        _check(http, requests)
        results = _measure(manager.port, requests, ctx)
        http.delete("/mcp", headers=_mcp_headers(sid))
    outcome.raw["results"] = results
    outcome.add(*_figures(results))
    outcome.notes.append("2 cores only: the load generator, the manager and the nodes share them.")
    return outcome
