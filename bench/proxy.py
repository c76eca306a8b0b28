"""Benchmark 2: proxy overhead of the manager, against nginx in front of the same node.

One real manager subprocess (process runtime, ``--log-level warning``) starts one session's node.
The same node is then loaded three ways, back to back, by the load generator (``bench.loadgen``,
a separate process: asyncio + httptools, closed loop, keep-alive connections):

* *direct*: the node's own port, with the ``X-ToolServer-Node-Secret`` header;
* *nginx*: Debian's nginx as a plain reverse proxy (one worker, keep-alive upstream, access log
  off, the secret injected with ``proxy_set_header``);
* *chp*: JupyterHub's configurable-http-proxy (Node.js; ``bench/chp.py``, installed into
  ``build/chp`` when missing), its default route to the node, the secret as a custom header;
* *relay*: a bare byte relay on uvloop (``bench/relay.py``), the secret sent by the client: it
  parses nothing, so its throughput is the ceiling of any proxy written in Python on this machine
  (the floor of its cost), against which the manager's and nginx's are read;
* *manager*: the manager's port with the session cookie (``auth: none``);
* *manager + key*: a second worker process of the same manager (same database, same node) with
  ``auth: api_keys``, the session cookie and ``Authorization: Bearer <key>``; the session was
  opened with that (user) key, so every request passes the key check and the owner check;
* *manager, Unix socket*: a second manager on the ``sandbox`` tier, whose node serves on a Unix
  socket (in a network namespace of its own): the same requests through the proxy over the socket.
  *Unix socket vs TCP* is its p50 latency and throughput against *manager*'s, same run.

Two requests: *small*, ``execute_tool`` of ``calculator("6*7")`` (59-byte body, answer ``42``);
*1 KB echo*, ``calculator`` of a 1,024-digit integer literal, which answers the same 1,024 digits
(1.08 KB body in, 1 KB out). Each is run at concurrency 1 and 64, with a warm-up, bounded by a
request count and a duration; the full run repeats every (target) measurement in two rounds in
alternating order and pools them. *Added latency* is the proxied percentile minus the direct one;
requests per second are the generator's completed answers over its timed phase. *Key check
adds* is manager + key minus manager, same run (two processes: on a loaded machine their spread
exceeds the check; ``bench/keycheck.py`` measures the check alone, in process). Everything
(node, proxy, generator) shares the same 2 cores, so throughput is the machine's, not a proxy's
alone.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import httpx

from bench import profiling
from bench.chp import ConfigurableHttpProxy, chp_version, ensure_chp
from bench.common import Context, Figure, Outcome, at_least, at_most
from bench.loadgen import build_request, compare, run_in_subprocess
from bench.nginx import Nginx, ensure_nginx
from bench.procs import Manager
from bench.relay import Relay
from toolserver.testing.tiers import PROCESS, SANDBOX

NAME = "proxy"
TITLE = "Proxy overhead"
ECHO_DIGITS = "1234567890" * 102 + "1234"  # 1,024 digits
WORKLOADS: dict[str, dict[str, Any]] = {
    "small": {"tool_name": "calculator", "arguments": {"expression": "6*7"}},
    "1 KB echo": {"tool_name": "calculator", "arguments": {"expression": ECHO_DIGITS}},
}
EXPECTED = {"small": "42", "1 KB echo": ECHO_DIGITS}
UNIX = "manager, Unix socket"
TARGETS = ("direct", "nginx", "chp", "relay", "manager", "manager + key", UNIX)
ADDED_P50_MS = 0.4
#: the node's own answer to the small call (issue 14)
NODE_P50_MS = 0.4
KEY_CHECK_P50_MS = 0.1
#: the manager's throughput against nginx's (small call, c=1 and c=64), and against chp's
THROUGHPUT_RATIO = 0.9
CHP_RATIO = 1.0
#: a sandbox node behind its Unix socket may be this much slower than a process node over TCP
SOCKET_VS_TCP = 0.10


class Endpoints:
    """Where each target listens and which headers it needs."""

    def __init__(self) -> None:
        self.ports: dict[str, int] = {}
        self.headers: dict[str, dict[str, str]] = {}

    def add(self, target: str, port: int, headers: dict[str, str]) -> None:
        self.ports[target] = port
        self.headers[target] = headers

    def request(self, target: str, payload: dict[str, Any]) -> bytes:
        body = json.dumps(payload, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", **self.headers[target]}
        return build_request("POST", "/execute_tool", "127.0.0.1", self.ports[target], body, headers)

    def check(self, workload: str) -> None:
        """One request per target through httpx: the answer must be the expected echo."""
        for target in self.ports:
            url = f"http://127.0.0.1:{self.ports[target]}/execute_tool"
            resp = httpx.post(url, json=WORKLOADS[workload], headers=self.headers[target], trust_env=False)
            if resp.status_code != 200 or resp.text.strip().strip('"') != EXPECTED[workload]:
                raise RuntimeError(f"{target} answered {resp.status_code}: {resp.text[:200]}")


def _spec(ends: Endpoints, target: str, workload: str, concurrency: int, ctx: Context) -> dict[str, Any]:
    requests = ctx.pick(3000, 600) if concurrency == 1 else ctx.pick(30000, 4000)
    return {
        "host": "127.0.0.1",
        "port": ends.ports[target],
        "request": ends.request(target, WORKLOADS[workload]).decode("latin-1"),
        "concurrency": concurrency,
        "requests": requests,
        "duration": ctx.pick(8, 3),
        "warmup": max(100, 2 * concurrency),
    }


def _load(ends: Endpoints, target: str, workload: str, concurrency: int, ctx: Context) -> dict[str, Any]:
    return run_in_subprocess(_spec(ends, target, workload, concurrency, ctx))


def _measure(ends: Endpoints, ctx: Context) -> dict[str, Any]:
    """{workload: {concurrency: {target: {latency_ms, rps, rps_mean, errors}}}}."""
    out: dict[str, Any] = {}
    for workload in WORKLOADS:
        ends.check(workload)
        out[workload] = {}
        for concurrency in (1, 64):
            specs = {t: _spec(ends, t, workload, concurrency, ctx) for t in TARGETS if t in ends.ports}
            out[workload][str(concurrency)] = compare(specs, ctx.pick(2, 1))
    return out


def _figures(results: dict[str, Any]) -> list[Figure]:
    rows = []
    node = results["small"]["1"]["direct"]
    rows.append(
        Figure(
            NAME,
            "the node itself: small call, c=1, p50",
            node["latency_ms"]["p50"],
            "ms",
            f"{node['rps_mean']:,.0f} req/s; p99 {node['latency_ms']['p99']:.3f} ms",
            f"≤ {NODE_P50_MS:g} ms",
            at_most(node["latency_ms"]["p50"], NODE_P50_MS),
        )
    )
    for workload, by_conc in results.items():
        for conc, cell in by_conc.items():
            lat = {t: cell[t]["latency_ms"] for t in cell}
            for pct in ("p50", "p99"):
                added = lat["manager"][pct] - lat["direct"][pct]
                ref = lat["nginx"][pct] - lat["direct"][pct]
                has_target = pct == "p50" and conc == "1" and workload == "small"
                chp = f", chp adds {lat['chp'][pct] - lat['direct'][pct]:.3f} ms" if "chp" in lat else ""
                rows.append(
                    Figure(
                        NAME,
                        f"{workload}, c={conc}: added latency {pct}",
                        added,
                        "ms",
                        f"nginx adds {ref:.3f} ms{chp} (direct {lat['direct'][pct]:.3f} ms)",
                        f"≤ {ADDED_P50_MS:g} ms" if has_target else "",
                        at_most(added, ADDED_P50_MS) if has_target else None,
                    )
                )
            key_added = lat["manager + key"]["p50"] - lat["manager"]["p50"]
            rows.append(
                Figure(
                    NAME,
                    f"{workload}, c={conc}: API key check adds (p50)",
                    key_added,
                    "ms",
                    f"auth: none p50 {lat['manager']['p50']:.3f} ms, "
                    f"api_keys {lat['manager + key']['p50']:.3f} ms",
                    f"≤ {KEY_CHECK_P50_MS:g} ms" if conc == "1" else "",
                    at_most(key_added, KEY_CHECK_P50_MS) if conc == "1" else None,
                )
            )
            if UNIX in lat:
                tcp, unix = lat["manager"]["p50"], lat[UNIX]["p50"]
                slower = (unix - tcp) / tcp if tcp else float("nan")
                rows.append(
                    Figure(
                        NAME,
                        f"{workload}, c={conc}: Unix-socket node vs TCP node, p50 latency",
                        100 * slower,
                        "%",
                        f"TCP (process node) {tcp:.3f} ms, Unix socket (sandbox node) {unix:.3f} ms",
                        f"≤ {100 * SOCKET_VS_TCP:g}%",
                        at_most(slower, SOCKET_VS_TCP),
                    )
                )
            rps = {t: cell[t]["rps_mean"] for t in cell}
            ratio = rps["manager"] / rps["nginx"] if rps["nginx"] else float("nan")
            has_target = workload == "small"
            chp = f", chp {rps['chp']:,.0f} req/s" if "chp" in rps else ""
            rows.append(
                Figure(
                    NAME,
                    f"{workload}, c={conc}: requests/s through the manager",
                    rps["manager"],
                    "req/s",
                    f"nginx {rps['nginx']:,.0f} req/s{chp}, direct {rps['direct']:,.0f} req/s, "
                    f"with a key {rps['manager + key']:,.0f} req/s",
                    f"≥ {100 * THROUGHPUT_RATIO:.0f}% of nginx" if has_target else "",
                    at_least(ratio, THROUGHPUT_RATIO) if has_target else None,
                    note=f"{100 * ratio:.0f}% of nginx"
                    + (f"; Unix-socket node {rps[UNIX]:,.0f} req/s" if UNIX in rps else ""),
                )
            )
            if "relay" in rps:
                rows.append(
                    Figure(
                        NAME,
                        f"{workload}, c={conc}: floor of a Python proxy, a bare uvloop byte relay (req/s)",
                        rps["relay"],
                        "req/s",
                        f"nginx {rps['nginx']:,.0f} req/s, manager {rps['manager']:,.0f} req/s",
                        note=f"{100 * rps['relay'] / rps['nginx']:.0f}% of nginx; the manager carries "
                        f"{100 * rps['manager'] / rps['relay']:.0f}% of it",
                    )
                )
            if "chp" in rps:
                chp_ratio = rps["manager"] / rps["chp"] if rps["chp"] else float("nan")
                rows.append(
                    Figure(
                        NAME,
                        f"{workload}, c={conc}: manager vs configurable-http-proxy (req/s)",
                        100 * chp_ratio,
                        "%",
                        f"chp {rps['chp']:,.0f} req/s, manager {rps['manager']:,.0f} req/s; "
                        f"chp adds {lat['chp']['p50'] - lat['direct']['p50']:.3f} ms p50",
                        "ahead of chp" if has_target else "",
                        at_least(chp_ratio, CHP_RATIO) if has_target else None,
                    )
                )
    return rows


def _profile_manager(ends: Endpoints, manager: Manager, ctx: Context) -> dict[str, Any]:
    """py-spy on the manager during an extra (unrecorded) manager run: small, c=64."""
    out = ctx.results_dir / "proxy-manager.pyspy.txt"
    with profiling.attach(manager.pid, out) as info:
        _load(ends, "manager", "small", 64, ctx)
    return info


def _keyed_worker(root: Any, manager: Manager, node: dict[str, Any]) -> Manager:
    """A second worker of ``manager`` (same database and manager id) that requires API keys."""
    return Manager(root / "manager-keys", node=node, auth="api_keys", **PROCESS.manager_config()).share_with(
        manager
    )


def run(ctx: Context) -> Outcome:
    outcome = Outcome(NAME, TITLE, method=__doc__ or "")
    binary, why = ensure_nginx()
    root = ctx.workdir / "proxy"
    node = {"health_check_interval": 1.0}
    tcp = PROCESS.manager_config()
    with (
        Manager(root / "manager", node=node, **tcp) as manager,
        _keyed_worker(root, manager, node) as keyed,
        Manager(root / "manager-sandbox", node=node, **SANDBOX.manager_config()) as sandboxed,
    ):
        key = manager.create_key("bench", "user", max_sessions=0, starts_per_minute=0)
        with httpx.Client(base_url=keyed.url, trust_env=False, timeout=120) as http:
            cookie = http.post("/get_cookie", headers={"Authorization": f"Bearer {key}"}).cookies["node_id"]
        record = manager.node(cookie)
        ends = Endpoints()
        ends.add("direct", record["port"], {"X-ToolServer-Node-Secret": record["secret"]})
        ends.add("manager", manager.port, {"Cookie": f"node_id={cookie}"})
        ends.add(
            "manager + key", keyed.port, {"Cookie": f"node_id={cookie}", "Authorization": f"Bearer {key}"}
        )
        with httpx.Client(base_url=sandboxed.url, trust_env=False, timeout=120) as http:
            unix_cookie = http.post("/get_cookie").cookies["node_id"]
        ends.add("manager, Unix socket", sandboxed.port, {"Cookie": f"node_id={unix_cookie}"})
        if binary is None:
            outcome.notes.append(f"nginx reference skipped: {why}")
            return outcome
        upstream = f"{record['ip']}:{record['port']}"
        chp_binary, chp_why = ensure_chp()
        with contextlib.ExitStack() as stack:
            nginx = stack.enter_context(Nginx(binary, root / "nginx", upstream, record["secret"]))
            ends.add("nginx", nginx.port, {})
            relay = stack.enter_context(Relay(root / "relay", upstream))
            ends.add("relay", relay.port, {"X-ToolServer-Node-Secret": record["secret"]})
            if chp_binary is None:
                outcome.notes.append(f"configurable-http-proxy reference skipped: {chp_why}")
            else:
                chp = ConfigurableHttpProxy(chp_binary, root / "chp", upstream, record["secret"])
                ends.add("chp", stack.enter_context(chp).port, {})
                outcome.notes.append(
                    f"configurable-http-proxy {chp_version(chp_binary)}, Node.js from the machine."
                )
            results = _measure(ends, ctx)
            outcome.raw["results"] = results
            outcome.add(*_figures(results))
            if ctx.profile or any(f.ok is False for f in outcome.figures):
                info = _profile_manager(ends, manager, ctx)
                outcome.raw["profile"] = info
                if "summary" in info:
                    outcome.notes.append(
                        "py-spy, manager under small c=64:\n" + profiling.describe(info["summary"])
                    )
    outcome.notes.append("2 cores only: load generator, nginx or manager, and the node share them.")
    return outcome
