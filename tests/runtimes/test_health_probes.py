"""The checker's view of local nodes (process and sandbox tiers): whether a node runs is seen on
every list(), but a healthy node is asked for /health only every ``health_probe_seconds`` (with
1,000 idle nodes, a request to each on every tick kept the manager's cores busy)."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from toolserver.runtimes.base import EXITED, HEALTHY, RUNNING, NodeInfo, Runtime
from toolserver.testing.conformance import ConformanceHarness
from toolserver.testing.tiers import PROCESS, SANDBOX, Tier


@pytest.fixture(params=[SANDBOX, PROCESS], ids=["sandbox", "process"])
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ConformanceHarness]:
    tier: Tier = request.param
    if tier.unavailable():
        pytest.skip(f"tier {tier.name}: {tier.unavailable()}")
    harness = ConformanceHarness(tier, tmp_path / "data", f"probe-{secrets.token_hex(4)}", 60.0, 1.0)
    try:
        yield harness
    finally:
        await harness.aclose()


def _counting(harness: ConformanceHarness, every: float) -> tuple[Runtime, list[str]]:
    """A runtime of the harness's tier probing healthy nodes every ``every`` seconds, and the ids
    of the nodes it asked for /health, in order."""
    runtime = harness.tier.make_runtime(
        harness.data_dir, harness.manager_id, stop_grace_seconds=1.0, health_probe_seconds=every
    )
    harness.made.append(runtime)
    asked: list[str] = []
    probe = runtime._probe  # type: ignore[attr-defined]

    async def counted(info: NodeInfo) -> Any:
        asked.append(info.node_id)
        return await probe(info)

    runtime._probe = counted  # type: ignore[attr-defined]
    return runtime, asked


async def _listed(runtime: Runtime, manager_id: str, node_id: str) -> NodeInfo:
    (info,) = [i for i in await runtime.list(manager_id) if i.node_id == node_id]
    return info


async def test_a_healthy_node_is_asked_once_per_probe_interval_and_its_death_seen_at_once(
    harness: ConformanceHarness,
) -> None:
    runtime, asked = _counting(harness, every=30)
    spec, info = await harness.started(runtime)
    asked.clear()  # the probes of the start (inspect always asks)
    for _ in range(6):
        listed = await _listed(runtime, harness.manager_id, spec.node_id)
        assert (listed.status, listed.health) == (RUNNING, HEALTHY)
    assert asked == [spec.node_id], f"asked {len(asked)} times in 6 lists with a 30 s probe interval"

    os.kill(int(info.state["pid"]), signal.SIGKILL)
    for _ in range(50):  # no probe due: liveness alone must say it
        listed = await _listed(runtime, harness.manager_id, spec.node_id)
        if listed.status == EXITED:
            break
        await asyncio.sleep(0.02)
    assert listed.status == EXITED, f"a killed node still listed as {listed.status}"
    assert asked == [spec.node_id]


async def test_probes_come_due_again_and_zero_means_every_list(harness: ConformanceHarness) -> None:
    runtime, asked = _counting(harness, every=0.2)
    spec, _ = await harness.started(runtime)
    asked.clear()
    await _listed(runtime, harness.manager_id, spec.node_id)
    await asyncio.sleep(0.3)  # past 0.2 s x 1.25, the longest spread interval
    await _listed(runtime, harness.manager_id, spec.node_id)
    assert asked == [spec.node_id] * 2

    every_time, asked_always = _counting(harness, every=0)
    for _ in range(3):
        assert (await _listed(every_time, harness.manager_id, spec.node_id)).health == HEALTHY
    assert asked_always == [spec.node_id] * 3
