"""Benchmark: density, N idle sessions on one manager (the default tier, sandbox).

One real manager subprocess (``node.max_nodes`` above N, a warm pool of 2, the checker ticking
every second as in production) gets N sessions, opened four at a time; none of them is used
again, so they idle. At each checkpoint (0, N/4, N/2, 3N/4 and N live sessions):

* ``GET /alive``: 200 requests one after another (the manager's responsiveness while the
  checker tracks every node), p50 and p99;
* warm claim: twelve sessions claimed from the pool (``/get_cookie``, the pool refilled before
  each) and released again, p50 (with ``--profile``, or when it misses its target at N, py-spy
  records the manager during twelve more claims at N, refills included);
* CPU: the CPU time of up to 20 idle node servers (their mean) and of the manager over 5 s in
  which nothing is asked of them;
* memory: unique set size (USS, ``psutil`` ``memory_full_info().uss``: the pages no other process
  shares) of up to 20 idle nodes, their mean, both of the node's server alone and of every process
  of the node (the server and its sandbox's bwrap, pasta and waiter processes, as the kernel lists
  them in the node's cgroup); the sum over all nodes is that mean times the count; the manager's
  RSS, and the USS of the template process the nodes are forked from (one per manager, shared by
  all of them).

Last, a notebook kernel is started in three of the sessions (a cell ``1 + 1``) and the USS of
each such node with its kernel process is taken. N is ``BENCH_DENSITY_N`` (default 200, 12 with
``--quick``): ``BENCH_DENSITY_N=1000 python -m bench only density`` runs the issue's 1,000 (about
20 minutes and 25 GB of free memory at today's footprint; mind the other work on the machine).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench import profiling
from bench.common import MIB, Context, Figure, Outcome, at_most, summary
from bench.procs import Manager
from toolserver.testing import cgroup_processes, node_servers

NAME = "density"
TITLE = "Density: idle sessions per host"
DEFAULT_N, QUICK_N = 200, 12
ALIVE_P99_MS = 10.0
IDLE_USS_MIB = 15.0
WARM_CLAIM_P50_MS = 15.0
OPEN_AT_ONCE = 4
USS_SAMPLE = 20
#: warm claims timed at each step (each waits for the pool to be full again first)
CLAIMS = 12
#: seconds over which the CPU time of idle nodes and of the manager is taken at each step
CPU_SECONDS = 5.0
EXECUTE = "/execute_tool"


def _count(ctx: Context) -> int:
    value = os.environ.get("BENCH_DENSITY_N")
    return int(value) if value else ctx.pick(DEFAULT_N, QUICK_N)


def _open(url: str) -> str:
    with httpx.Client(base_url=url, timeout=300, trust_env=False) as http:
        resp = http.post("/get_cookie")
        resp.raise_for_status()
        return resp.cookies["node_id"]


def _alive_ms(http: httpx.Client, count: int = 200) -> dict[str, float]:
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        http.get("/alive").raise_for_status()
        times.append((time.perf_counter() - t0) * 1000)
    return summary(times)


def _warm_claims(manager: Manager, http: httpx.Client, count: int = CLAIMS) -> list[float]:
    out = []
    for _ in range(count):
        deadline = time.monotonic() + 120
        while len(manager.pooled_ready()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        t0 = time.perf_counter()
        resp = http.post("/get_cookie")
        out.append((time.perf_counter() - t0) * 1000)
        resp.raise_for_status()
        http.post("/release_session", cookies={"node_id": resp.cookies["node_id"]})
    return out


def _uss_mib(procs: list[psutil.Process]) -> list[float]:
    out = []
    for proc in procs[:USS_SAMPLE]:
        with contextlib.suppress(psutil.Error):
            out.append(proc.memory_full_info().uss / MIB)
    return out


def _whole_node_uss_mib(data_dir: Path) -> list[float]:
    """USS of every process of up to :data:`USS_SAMPLE` sandboxed nodes (server and wrappers)."""
    nodes = data_dir / "nodes"
    out = []
    for node in sorted(nodes.iterdir())[:USS_SAMPLE] if nodes.is_dir() else []:
        total = 0
        for proc in cgroup_processes([node.name]):
            with contextlib.suppress(psutil.Error):
                total += proc.memory_full_info().uss
        if total:
            out.append(total / MIB)
    return out


def _template_uss_mib(manager: Manager) -> float | None:
    """USS of the manager's template process(es), the one copy of the stack nodes share."""
    total = 0
    with contextlib.suppress(psutil.Error):
        for proc in psutil.Process(manager.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                # A forked server shows the template's command line too; its parent is the
                # sandbox's bwrap, the template's is the manager.
                if "--template-fd" in proc.cmdline() and proc.parent().name() != "bwrap":
                    total += proc.memory_full_info().uss
    return total / MIB if total else None


def _with_kernel_mib(manager: Manager, cookies: list[str]) -> list[float]:
    """USS of each node with a kernel (the node process plus its children), after one cell."""
    with httpx.Client(base_url=manager.url, timeout=300, trust_env=False) as http:
        for cookie in cookies:
            body = {"tool_name": "PythonNotebook_execute_cell", "arguments": {"code": "1 + 1"}}
            resp = http.post(EXECUTE, json=body, cookies={"node_id": cookie})
            if resp.status_code != 200:
                raise RuntimeError(f"notebook cell answered {resp.status_code}: {resp.text[:200]}")
    out = []
    for proc in node_servers(manager.data_dir):
        with contextlib.suppress(psutil.Error):
            children = proc.children(recursive=True)
            if children:  # its kernel (only those sessions ran a cell)
                out.append(sum(p.memory_full_info().uss for p in [proc, *children]) / MIB)
    return out


#: USS floors: an idle interpreter with what a node must import, measured in the same run
USS_FLOORS = {
    "bare python": "",
    "python + asyncio, uvloop": "import asyncio, uvloop",
    "python + the node's stack": (
        "import uvloop, httptools, starlette.routing, starlette.responses, pydantic_settings"
    ),
}


def uss_floors() -> dict[str, float]:
    """USS (MiB) of interpreters that imported only :data:`USS_FLOORS`, then wait."""
    out = {}
    for what, code in USS_FLOORS.items():
        script = f"{code}\nimport sys\nprint('ready', flush=True)\nsys.stdin.read()"
        proc = subprocess.Popen(
            [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        try:
            assert proc.stdout is not None
            proc.stdout.readline()
            out[what] = psutil.Process(proc.pid).memory_full_info().uss / MIB
        finally:
            proc.kill()
            proc.wait()
    return out


def _idle_cpu(manager: Manager, nodes: list[psutil.Process], seconds: float = CPU_SECONDS) -> dict[str, Any]:
    """CPU time (ms a second) of up to :data:`USS_SAMPLE` idle node servers, on average, and of
    the manager, over ``seconds`` of nothing asked."""
    procs = [psutil.Process(manager.pid), *nodes[:USS_SAMPLE]]

    def used() -> list[float]:
        out = []
        for proc in procs:
            try:
                times = proc.cpu_times()
                out.append(times.user + times.system)
            except psutil.Error:
                out.append(float("nan"))
        return out

    before = used()
    time.sleep(seconds)
    spent = [(b - a) * 1000 / seconds for a, b in zip(before, used(), strict=True)]
    node_ms = [x for x in spent[1:] if x == x]
    mean = sum(node_ms) / len(node_ms) if node_ms else float("nan")
    return {"manager_ms_per_s": spent[0], "node_ms_per_s": mean}


def _checkpoint(manager: Manager, http: httpx.Client, live: int) -> dict[str, Any]:
    nodes = node_servers(manager.data_dir)
    cpu = _idle_cpu(manager, nodes)
    uss = _uss_mib(nodes)
    mean_uss = sum(uss) / len(uss) if uss else float("nan")
    whole = _whole_node_uss_mib(manager.data_dir)
    mean_whole = sum(whole) / len(whole) if whole else mean_uss
    return {
        "sessions": live,
        "node_processes": len(nodes),
        "alive_ms": _alive_ms(http),
        "warm_claim_ms": summary(_warm_claims(manager, http)),
        "server_uss_mib": mean_uss,
        "idle_uss_mib": mean_whole,
        "nodes_uss_total_mib": mean_whole * len(nodes),
        "template_uss_mib": _template_uss_mib(manager),
        "manager_rss_mib": psutil.Process(manager.pid).memory_info().rss / MIB,
        "available_mib": psutil.virtual_memory().available / MIB,
        **cpu,
    }


def run(ctx: Context) -> Outcome:
    outcome = Outcome(NAME, TITLE, method=__doc__ or "")
    n = _count(ctx)
    steps = sorted({0, n // 4, n // 2, 3 * n // 4, n})
    node = {"warm_pool_size": 2, "max_nodes": n + 16, "health_check_interval": 1.0}
    curve: list[dict[str, Any]] = []
    cookies: list[str] = []
    started = time.monotonic()
    with (
        Manager(ctx.workdir / "density", node=node) as manager,
        httpx.Client(base_url=manager.url, timeout=300, trust_env=False) as http,
        concurrent.futures.ThreadPoolExecutor(OPEN_AT_ONCE) as pool,
    ):
        for step in steps:
            missing = step - len(cookies)
            try:
                cookies += list(pool.map(lambda _: _open(manager.url), range(missing)))
            except httpx.HTTPError:  # the manager's log says why (the work directory goes)
                shutil.copyfile(manager.log_path, ctx.results_dir / "density-manager.log")
                raise
            curve.append(_checkpoint(manager, http, len(cookies)))
            print(
                f"    {len(cookies)} sessions: {curve[-1]['alive_ms']['p99']:.1f} ms /alive p99", flush=True
            )
        profile = None
        if ctx.profile or curve[-1]["warm_claim_ms"]["p50"] > WARM_CLAIM_P50_MS:
            with profiling.attach(manager.pid, ctx.results_dir / "density-claims.pyspy.txt") as profile:
                _warm_claims(manager, http)
        kernels = _with_kernel_mib(manager, cookies[:3])
        stopping = time.monotonic()
        clean = manager.stop(timeout=120 + n)  # node.on_shutdown: stop, every node
        shutdown_s = time.monotonic() - stopping
    floors = uss_floors()
    outcome.raw = {
        "uss_floors_mib": floors,
        "n": n,
        "curve": curve,
        "with_kernel_uss_mib": kernels,
        "seconds": time.monotonic() - started,
        "shutdown_s": shutdown_s,
        "shutdown_clean": clean,
        "claims_profile": profile,
    }
    last, first = curve[-1], curve[0]
    outcome.add(
        Figure(
            NAME,
            f"/alive p99 with {n} idle sessions",
            last["alive_ms"]["p99"],
            "ms",
            f"with none: {first['alive_ms']['p99']:.2f} ms (p50 {last['alive_ms']['p50']:.2f} ms)",
            f"≤ {ALIVE_P99_MS:g} ms",
            at_most(last["alive_ms"]["p99"], ALIVE_P99_MS),
        ),
        Figure(
            NAME,
            f"warm claim (/get_cookie) p50 with {n} idle sessions",
            last["warm_claim_ms"]["p50"],
            "ms",
            f"with none: {first['warm_claim_ms']['p50']:.1f} ms",
            f"≤ {WARM_CLAIM_P50_MS:g} ms",
            at_most(last["warm_claim_ms"]["p50"], WARM_CLAIM_P50_MS),
        ),
        Figure(
            NAME,
            "USS per idle node (server and sandbox processes)",
            last["idle_uss_mib"],
            "MiB",
            f"nodes' total {last['nodes_uss_total_mib']:.0f} MiB for {last['node_processes']} nodes; "
            f"manager RSS {last['manager_rss_mib']:.0f} MiB",
            f"≤ {IDLE_USS_MIB:g} MiB",
            at_most(last["idle_uss_mib"], IDLE_USS_MIB),
            note=f"the server alone {last['server_uss_mib']:.1f} MiB",
        ),
        Figure(
            NAME,
            f"CPU of an idle node (its server, mean of {min(USS_SAMPLE, n + 2)}), with {n} idle sessions",
            last["node_ms_per_s"],
            "ms/s",
            f"{last['node_ms_per_s'] * (n + 2) / 1000:.2f} cores for all {n + 2}; the manager "
            f"{last['manager_ms_per_s']:.0f} ms/s (with none: {first['manager_ms_per_s']:.0f} ms/s)",
        ),
        Figure(
            NAME,
            "USS of the template the nodes are forked from (once per manager)",
            last["template_uss_mib"],
            "MiB",
            f"an idle node {last['idle_uss_mib']:.1f} MiB",
        ),
        Figure(
            NAME,
            "USS per node with a started kernel (node + kernel)",
            sum(kernels) / len(kernels) if kernels else None,
            "MiB",
            f"idle node {last['idle_uss_mib']:.1f} MiB",
        ),
        Figure(
            NAME,
            f"manager shutdown, stopping its {n + 2} idle nodes (node.on_shutdown: stop)",
            shutdown_s,
            "s",
            "exited by itself" if clean else "killed: it did not finish in time",
        ),
    )
    outcome.add(
        *(
            Figure(NAME, f"USS floor: {what}", mib, "MiB", "same run, idle interpreter")
            for what, mib in floors.items()
        )
    )
    stack = list(floors.values())[-1]
    outcome.notes.append(
        f"An idle node's USS is {last['idle_uss_mib']:.1f} MiB with its sandbox's processes "
        f"({last['server_uss_mib']:.1f} MiB its server); an interpreter that only imported the node's "
        f"third-party stack holds {stack:.1f} MiB of its own (same run). Nodes forked from the "
        "template share its pages until they write them."
    )
    if profile and profile.get("summary"):
        outcome.notes.append(
            f"py-spy, manager during {CLAIMS} warm claims with {n} idle sessions (pool refills "
            "and checker ticks included):\n" + profiling.describe(profile["summary"])
        )
    outcome.notes.append(
        f"{n} sessions opened {OPEN_AT_ONCE} at a time in {outcome.raw['seconds']:.0f} s; "
        "`BENCH_DENSITY_N=1000 python -m bench only density` for the issue's 1,000."
    )
    return outcome
