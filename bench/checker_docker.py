"""Benchmark 4b: the checker's tick with real Docker nodes (50 containers of the node image).

No double here: the Docker runtime starts N real containers, their records go into a real SQLite
store, and ``NodeChecker.tick()`` is timed as the manager runs it (one labelled list call to the
Engine per tick, the records read and mirrored). The reference is the Engine's list call alone.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

from bench import dockerenv
from bench.common import Context, Figure, Outcome, summary
from toolserver.manager.checker import NodeChecker
from toolserver.manager.models import ToolServerNode
from toolserver.manager.settings import load_settings
from toolserver.manager.store import open_store
from toolserver.runtimes import create_runtime
from toolserver.runtimes.base import NodeSpec
from toolserver.testing import scratch_config
from toolserver.testing.tiers import DOCKER

NAME = "checker_docker"
TITLE = "Checker cost, real Docker nodes"
START_CONCURRENCY = 4


async def _measure(ctx: Context, n: int, ticks: int) -> dict[str, Any]:
    root = ctx.workdir / "checker-docker"
    root.mkdir(parents=True, exist_ok=True)
    settings = load_settings(
        None,
        **scratch_config(root),
        manager_id=f"bench-checker-docker-{secrets.token_hex(3)}",
        **DOCKER.manager_config(),
    )
    store = await open_store(settings.database_url)
    runtime = create_runtime(settings.runtime_config, settings.runtime_context())
    states: list[dict[str, Any]] = []
    sem = asyncio.Semaphore(START_CONCURRENCY)

    async def start_one() -> None:
        record = ToolServerNode.new(settings.manager_id, "docker")
        async with sem:
            info = await runtime.create(NodeSpec(record.short_id, settings.manager_id, record.secret))
            states.append(info.state)
            info = await runtime.start(info.state)
        record.status, record.health, record.ip, record.port = info.status, info.health, info.host, info.port
        record.runtime_state = info.state
        await store.add_node(record)

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(start_one() for _ in range(n)))
        started_s = time.perf_counter() - t0
        checker = NodeChecker(settings, store, runtime)
        for _ in range(3):
            await checker.tick()
        tick_ms, list_ms = [], []
        for _ in range(ticks):
            report = await checker.tick()
            if report.nodes != n or report.deleted or report.orphans:
                raise RuntimeError(f"unexpected tick: {report}")
            tick_ms.append(report.seconds * 1000)
            t1 = time.perf_counter()
            await runtime.list(settings.manager_id)
            list_ms.append((time.perf_counter() - t1) * 1000)
        return {"n": n, "start_all_s": started_s, "tick_ms": summary(tick_ms), "list_ms": summary(list_ms)}
    finally:
        await asyncio.gather(*(runtime.remove(s) for s in states), return_exceptions=True)
        await runtime.aclose()
        await store.aclose()


def run(ctx: Context) -> Outcome:
    outcome = Outcome(NAME, TITLE, method=__doc__ or "")
    reason = dockerenv.unavailable_reason()
    if reason:
        outcome.notes.append(f"skipped: {reason}")
        return outcome
    n = ctx.pick(50, 10)
    result = asyncio.run(_measure(ctx, n, ctx.pick(20, 5)))
    outcome.raw = result
    outcome.add(
        Figure(
            NAME,
            f"tick p50, {n} running containers",
            result["tick_ms"]["p50"],
            "ms",
            f"Engine list call alone {result['list_ms']['p50']:.1f} ms",
            note=f"p99 {result['tick_ms']['p99']:.1f} ms",
        )
    )
    outcome.notes.append(
        f"{n} containers started in {result['start_all_s']:.1f} s, {START_CONCURRENCY} at a time."
    )
    return outcome
