"""Benchmark: replicated managers and the swarm runtime.

Replicas: real manager processes (process nodes, one data directory) on one throwaway PostgreSQL
server, measured with one replica and then with two in the same run: cold session starts per
second (``/get_cookie`` then ``/release_session``, a few clients at once, spread round robin over
the replicas), and warm claims (``/get_cookie`` answered from ready warm pools of 4 nodes per
replica, all claims at once). On this 2-core machine both replicas share the same cores, so the
figure shows what a second replica costs or gains here, not a second host's capacity.

Swarm: the cold start of a node through the swarm runtime (create, start, healthy: a service
scaled to 1, its task placed, the node's GET /health answering) next to a bare ``docker service
create --detach --no-resolve-image`` of the same image with a host-mode port, polled until the
same GET /health answers. The engine is put in swarm mode for the run when it is not in it
(and left again afterwards).
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from bench import dockerenv
from bench.common import Context, Figure, Outcome, summary
from bench.procs import Manager, register_root
from toolserver.runtimes.base import NodeSpec
from toolserver.testing.swarm import SwarmMode
from toolserver.testing.tiers import SWARM, node_image

NAME = "cluster"
TITLE = "Replicated managers and the swarm runtime"
CLIENTS = 4
POOL = 4


def _replicas(root: Path, url: str, n: int, **node: Any) -> list[Manager]:
    data = root / "data"
    register_root(data)  # the shared node directories: cleaned up with the run
    made = []
    for i in range(n):
        m = Manager(
            root / f"replica{i}",
            database_url=url,
            data_dir=str(data),
            manager_id=f"bench-replica{i}-{secrets.token_hex(3)}",
            node={"health_check_interval": 0.5, "on_shutdown": "stop", **node},
        )
        made.append(m.start())
    return made


def _starts(managers: list[Manager], count: int) -> dict[str, Any]:
    """``count`` cold starts and releases over ``managers``, CLIENTS at a time."""
    urls = [m.url for m in managers]

    def one(i: int) -> float:
        url = urls[i % len(urls)]
        t0 = time.perf_counter()
        r = httpx.post(url + "/get_cookie", timeout=120, trust_env=False)
        took = time.perf_counter() - t0
        if r.status_code != 200:
            raise RuntimeError(f"/get_cookie answered {r.status_code}: {r.text}")
        cookie = {"Cookie": f"node_id={r.cookies['node_id']}"}
        other = urls[(i + 1) % len(urls)]  # released through another replica
        httpx.post(other + "/release_session", headers=cookie, timeout=60, trust_env=False)
        return took

    t0 = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        seconds = list(pool.map(one, range(count)))
    wall = time.perf_counter() - t0
    return {"per_second": count / wall, "start_s": summary(seconds)}


def _claims(managers: list[Manager], server: Any) -> dict[str, Any]:
    """Every ready pool node claimed at once, round robin over the replicas."""
    deadline = time.monotonic() + 120
    ready = (
        "SELECT count(*) AS n FROM toolserver_nodes"
        " WHERE pooled AND status = 'running' AND health = 'healthy'"
    )
    while server.rows(ready)[0]["n"] < POOL * len(managers):
        if time.monotonic() > deadline:
            raise RuntimeError("warm pools not ready within 120 s")
        time.sleep(0.2)
    urls = [m.url for m in managers]
    count = POOL * len(managers)

    def one(i: int) -> tuple[float, str]:
        t0 = time.perf_counter()
        r = httpx.post(urls[i % len(urls)] + "/get_cookie", timeout=120, trust_env=False)
        r.raise_for_status()
        return time.perf_counter() - t0, r.cookies["node_id"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(count) as pool:
        results = list(pool.map(one, range(count)))
    wall = time.perf_counter() - t0
    return {"per_second": count / wall, "claim_s": summary([s for s, _ in results]), "count": count}


def _replica_figures(ctx: Context, outcome: Outcome) -> None:
    from tests.support import PostgresServer

    server = PostgresServer()
    server.start()
    raw: dict[str, Any] = {}
    try:
        for n in (1, 2):
            root = ctx.workdir / f"cluster-{n}"
            managers = _replicas(root, server.url, n)
            try:
                _starts(managers, 2)  # warm-up: imports, connections
                raw[f"starts_{n}"] = _starts(managers, ctx.pick(24, 8))
            finally:
                for m in managers:
                    m.stop()
            root = ctx.workdir / f"cluster-pool-{n}"
            managers = _replicas(root, server.url, n, warm_pool_size=POOL)
            try:
                raw[f"claims_{n}"] = _claims(managers, server)
            finally:
                for m in managers:
                    m.stop()
    finally:
        server.remove()
    outcome.raw["replicas"] = raw
    for n in (1, 2):
        s, c = raw[f"starts_{n}"], raw[f"claims_{n}"]
        outcome.add(
            Figure(
                NAME,
                f"cold session starts per second, {n} replica(s)",
                s["per_second"],
                "/s",
                f"start p50 {s['start_s']['p50']:.2f} s, {CLIENTS} clients",
            ),
            Figure(
                NAME,
                f"warm claims per second, {n} replica(s)",
                c["per_second"],
                "/s",
                f"{c['count']} claims at once, claim p50 {c['claim_s']['p50'] * 1000:.0f} ms",
            ),
        )


async def _swarm_runtime_start(root: Path, n: int) -> list[float]:
    runtime = SWARM.make_runtime(root, f"bench-swarm-{secrets.token_hex(3)}")
    seconds, states = [], []
    try:
        for _ in range(n):
            spec = NodeSpec(secrets.token_hex(6), runtime.context.manager_id, secrets.token_urlsafe(16))
            t0 = time.perf_counter()
            info = await runtime.create(spec)
            states.append(info.state)
            info = await runtime.start(info.state)
            while not (info.running and info.health == "healthy"):
                await asyncio.sleep(0.02)
                info = await runtime.inspect(info.state)
            seconds.append(time.perf_counter() - t0)
    finally:
        for state in states:
            await runtime.remove(state)
        await runtime.aclose()
    return seconds


def _bare_service_start(n: int, *extra: str) -> list[float]:
    image = node_image()
    seconds = []
    for _ in range(n):
        name = f"bench-bare-{secrets.token_hex(4)}"
        cmd = ["docker", "service", "create", "--detach", "--no-resolve-image", "--name", name]
        cmd += ["--restart-condition", "none", "--publish", f"mode=host,target={dockerenv.NODE_PORT}"]
        cmd += ["--env", "TOOLSERVER_NODE_SECRET=bench", *extra, image]
        t0 = time.perf_counter()
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=120)
            port = None
            with httpx.Client(timeout=1.0, trust_env=False) as http:
                while time.perf_counter() - t0 < 120:
                    if port is None:
                        fmt = "{{range .Status.PortStatus.Ports}}{{.PublishedPort}} {{end}}"
                        ps = ["docker", "service", "ps", "-q", "--filter", "desired-state=running", name]
                        ids = subprocess.run(ps, capture_output=True, text=True, timeout=30).stdout.split()
                        if ids:
                            inspect = ["docker", "inspect", "-f", fmt, ids[0]]
                            done = subprocess.run(inspect, capture_output=True, text=True, timeout=30)
                            out = done.stdout.split()
                            port = int(out[0]) if out else None
                    if port is not None:
                        try:
                            if http.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                                break
                        except httpx.HTTPError:
                            pass
                    time.sleep(0.02)
            seconds.append(time.perf_counter() - t0)
        finally:
            subprocess.run(["docker", "service", "rm", name], capture_output=True, timeout=60)
    return seconds


def _swarm_figures(ctx: Context, outcome: Outcome) -> None:
    reason = dockerenv.unavailable_reason()
    if reason:
        outcome.notes.append(f"swarm skipped: {reason}")
        return
    mode = SwarmMode()
    if not mode.ensure():
        outcome.notes.append(f"swarm skipped: {mode.error}")
        return
    try:
        n = ctx.pick(5, 2)
        runtime_s = asyncio.run(_swarm_runtime_start(ctx.workdir / "swarm", n))
        bare_s = _bare_service_start(n, "--no-healthcheck")
        default_s = _bare_service_start(1)
    finally:
        mode.restore()
    outcome.raw["swarm"] = {
        "runtime_s": summary(runtime_s),
        "bare_s": summary(bare_s),
        "bare_with_healthcheck_s": summary(default_s),
    }
    outcome.add(
        Figure(
            NAME,
            "swarm node cold start p50 (create, start, healthy)",
            summary(runtime_s)["p50"],
            "s",
            f"bare docker service create --no-resolve-image --no-healthcheck {summary(bare_s)['p50']:.2f} s",
            note=f"{n} starts each",
        )
    )
    outcome.notes.append(
        f"A bare service with the image's own HEALTHCHECK (30 s interval) took {default_s[0]:.1f} s: Swarm "
        "holds the task in 'starting', its port unpublished, until the first probe; the runtime turns the "
        "HEALTHCHECK off and probes GET /health itself."
    )


def run(ctx: Context) -> Outcome:
    outcome = Outcome(NAME, TITLE, method=__doc__ or "")
    _replica_figures(ctx, outcome)
    _swarm_figures(ctx, outcome)
    return outcome
