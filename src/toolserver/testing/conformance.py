"""The runtime contract (:mod:`toolserver.runtimes.base`) as one test suite that every runtime
passes, built-in or third-party.

A runtime package subclasses :class:`RuntimeConformance` in one of its test modules (the class
name starts with ``Test`` so that pytest collects it) and gives it a ``tier`` fixture, the
:class:`~toolserver.testing.tiers.Tier` describing its runtime::

    import pytest
    from toolserver.testing.conformance import RuntimeConformance
    from toolserver.testing.tiers import Tier

    class TestKubernetesRuntime(RuntimeConformance):
        @pytest.fixture
        def tier(self) -> Tier:
            return Tier("kubernetes", runtime_config={"namespace": "ci"}, leftovers=pods_left)

The suite drives real nodes through the runtime (create, start, inspect, list, stop, restart,
kill, remove) and reaches each node over HTTP at the address the runtime reports, with the
node's secret, as the manager's proxy does; files are written into the workspace through the
node's API. Each test uses its own manager id and removes what it made. It needs pytest and
pytest-asyncio (``pip install toolserver[testing]``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
import pytest_asyncio

from toolserver.errors import NodeNotFound
from toolserver.protocol import SECRET_HEADER
from toolserver.runtimes.base import (
    CREATED,
    EXITED,
    HEALTHY,
    PAUSED,
    RUNNING,
    UNIX_PREFIX,
    NodeInfo,
    NodeSpec,
    Runtime,
)
from toolserver.testing.tiers import Tier

__all__ = ["ConformanceHarness", "RuntimeConformance"]

WRITE = "FileSystemEnv_write_to_file"
SHELL = "shell_command_executor"
#: Statuses of a node that no longer runs (Docker's words).
STOPPED = {EXITED, "dead"}


@dataclass
class ConformanceHarness:
    """One test's runtimes and nodes: makes them, waits for them, talks to them, cleans up."""

    tier: Tier
    data_dir: Path
    manager_id: str
    ready_timeout: float
    stop_grace: float
    made: list[Runtime] = field(default_factory=list)
    states: list[dict[str, Any]] = field(default_factory=list)

    def runtime(self) -> Runtime:
        """A new runtime object of the tier (a second one stands for a restarted manager)."""
        runtime = self.tier.make_runtime(self.data_dir, self.manager_id, stop_grace_seconds=self.stop_grace)
        self.made.append(runtime)
        return runtime

    def spec(self, **env: str) -> NodeSpec:
        return NodeSpec(secrets.token_hex(6), self.manager_id, secrets.token_urlsafe(16), dict(env))

    async def create(self, runtime: Runtime, spec: NodeSpec | None = None) -> tuple[NodeSpec, NodeInfo]:
        spec = spec or self.spec()
        info = await runtime.create(spec)
        self.states.append(info.state)
        return spec, info

    async def started(self, runtime: Runtime, spec: NodeSpec | None = None) -> tuple[NodeSpec, NodeInfo]:
        """A node created, started and healthy."""
        spec, info = await self.create(runtime, spec)
        info = await runtime.start(info.state)
        self.states.append(info.state)
        return spec, await self.ready(runtime, info.state)

    async def until(self, runtime: Runtime, state: dict[str, Any], done: Any, what: str) -> NodeInfo:
        """Inspect the node until ``done(info)``; AssertionError after ``ready_timeout``."""
        deadline = time.monotonic() + self.ready_timeout
        while True:
            info = await runtime.inspect(state)
            if done(info):
                return info
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"node {info.node_id} not {what} after {self.ready_timeout:g} s: "
                    f"{info.status}/{info.health} ({info.detail})"
                )
            await asyncio.sleep(0.1)

    async def ready(self, runtime: Runtime, state: dict[str, Any]) -> NodeInfo:
        def healthy(info: NodeInfo) -> bool:
            assert info.status in (CREATED, RUNNING), f"node stopped while starting: {info.detail}"
            return info.running and info.health == HEALTHY

        return await self.until(runtime, state, healthy, "healthy")

    async def stopped(self, runtime: Runtime, state: dict[str, Any]) -> NodeInfo:
        return await self.until(runtime, state, lambda i: i.status in STOPPED, "stopped")

    async def stop_and_start(self, runtime: Runtime, state: dict[str, Any]) -> NodeInfo:
        """Stop the node, see it stopped, start it again and wait until it is healthy."""
        await runtime.stop(state, self.stop_grace)
        stopped = await self.stopped(runtime, state)
        await runtime.stop(stopped.state, self.stop_grace)  # a stopped node stays as it is
        started = await runtime.start(json.loads(json.dumps(stopped.state)))
        return await self.ready(runtime, started.state)

    @contextlib.asynccontextmanager
    async def http(self, info: NodeInfo, spec: NodeSpec | None) -> AsyncIterator[httpx.AsyncClient]:
        """An HTTP client for the node at the address the runtime reports; with ``spec``, it sends
        the node's secret as the manager's proxy does."""
        headers = {SECRET_HEADER: spec.secret} if spec else {}
        if info.host.startswith(UNIX_PREFIX):  # a node in a network namespace of its own
            transport = httpx.AsyncHTTPTransport(uds=info.host[len(UNIX_PREFIX) :])
            base_url = "http://node"
        else:
            assert info.host and info.port, f"node {info.node_id} reports no address"
            transport, base_url = None, f"http://{info.host}:{info.port}"
        async with httpx.AsyncClient(
            base_url=base_url, headers=headers, timeout=30, trust_env=False, transport=transport
        ) as client:
            yield client

    async def tool(self, info: NodeInfo, spec: NodeSpec, name: str, **arguments: Any) -> Any:
        async with self.http(info, spec) as client:
            r = await client.post("/execute_tool", json={"tool_name": name, "arguments": arguments})
        assert r.status_code == 200, f"{name}: {r.status_code} {r.text}"
        return r.json()

    async def write(self, info: NodeInfo, spec: NodeSpec, path: str, content: str) -> None:
        """Write a text file into the workspace (the file tool's lines end with a newline)."""
        await self.tool(info, spec, WRITE, filepath=path, content=content)

    async def read(self, info: NodeInfo, spec: NodeSpec, path: str) -> str:
        async with self.http(info, spec) as client:
            r = await client.post("/download_file", json={"file_path": path})
        assert r.status_code == 200, f"download {path}: {r.status_code} {r.text}"
        return r.text

    async def aclose(self) -> None:
        """Remove every node this test made (listed or remembered), then close the runtimes."""
        cleaner = self.runtime()
        with contextlib.suppress(Exception):
            self.states.extend(i.state for i in await cleaner.list(self.manager_id))
        for state in reversed(self.states):
            with contextlib.suppress(Exception):
                await cleaner.remove(state)
        for runtime in self.made:
            with contextlib.suppress(Exception):
                await runtime.aclose()


class RuntimeConformance:
    """The contract suite; subclass it as ``Test<YourRuntime>`` and give it a ``tier`` fixture."""

    #: Longest wait for a node to become healthy or stopped (seconds).
    ready_timeout: ClassVar[float] = 60.0
    #: SIGTERM → SIGKILL grace the suite stops nodes with (seconds).
    stop_grace: ClassVar[float] = 1.0

    @pytest.fixture
    def tier(self) -> Tier:
        raise NotImplementedError("a RuntimeConformance subclass gives the `tier` fixture of its runtime")

    @pytest_asyncio.fixture
    async def harness(self, tier: Tier, tmp_path: Path) -> AsyncIterator[ConformanceHarness]:
        reason = tier.unavailable()
        if reason:
            pytest.skip(f"tier {tier.name}: {reason}")
        harness = ConformanceHarness(
            tier,
            tmp_path / "data",
            f"conformance-{secrets.token_hex(5)}",
            self.ready_timeout,
            self.stop_grace,
        )
        try:
            yield harness
        finally:
            await harness.aclose()

    @pytest.mark.asyncio
    async def test_create_gives_a_created_node_with_a_json_state(self, harness: ConformanceHarness) -> None:
        runtime = harness.runtime()
        spec, info = await harness.create(runtime)
        got = (info.node_id, info.manager_id, info.status)
        assert got == (spec.node_id, spec.manager_id, CREATED), f"create reported {got}"
        assert json.loads(json.dumps(info.state)) == info.state, f"state is not JSON: {info.state!r}"
        inspected = await runtime.inspect(info.state)
        assert inspected.status == CREATED, f"a created node inspects as {inspected.status}"

    @pytest.mark.asyncio
    async def test_start_serves_the_node_with_its_secret_and_env(self, harness: ConformanceHarness) -> None:
        runtime = harness.runtime()
        mark = secrets.token_hex(8)
        spec, info = await harness.started(runtime, harness.spec(CONFORMANCE_MARK=mark))
        async with harness.http(info, None) as client:
            health = await client.get("/health")
            assert health.status_code == 200, f"GET /health without the secret: {health.status_code}"
            anonymous = await client.post("/execute_tool", json={"tool_name": SHELL, "arguments": {}})
        assert anonymous.status_code == 401, "the node serves requests without its secret"
        out = await harness.tool(info, spec, SHELL, command="printenv CONFORMANCE_MARK")
        assert mark in json.dumps(out), "the spec's environment did not reach the node"

    @pytest.mark.asyncio
    async def test_list_reports_this_managers_nodes_in_one_call(self, harness: ConformanceHarness) -> None:
        runtime = harness.runtime()
        running_spec, running = await harness.started(runtime)
        created_spec, _ = await harness.create(runtime)
        listed = {i.node_id: i for i in await runtime.list(harness.manager_id)}
        want = {running_spec.node_id, created_spec.node_id}
        assert set(listed) == want, f"list gave {sorted(listed)}, made {sorted(want)}"
        one = listed[running_spec.node_id]
        assert one.running, f"a running node lists as {one.status}"
        assert (one.host, one.port) == (running.host, running.port), (
            "list and inspect disagree on the address"
        )
        assert listed[created_spec.node_id].status == CREATED, "a created node lists as not created"
        others = await runtime.list(f"{harness.manager_id}-other")
        assert others == [], f"another manager's list shows this one's nodes: {others}"

    @pytest.mark.asyncio
    async def test_stop_start_and_restart_keep_the_workspace(self, harness: ConformanceHarness) -> None:
        runtime = harness.runtime()
        spec, info = await harness.started(runtime)
        await harness.write(info, spec, "kept.txt", "survives\n")
        info = await harness.stop_and_start(runtime, info.state)
        assert await harness.read(info, spec, "kept.txt") == "survives\n", "stop + start lost the workspace"
        info = await runtime.restart(info.state, harness.stop_grace)
        info = await harness.ready(runtime, info.state)
        assert await harness.read(info, spec, "kept.txt") == "survives\n", "restart lost the workspace"

    @pytest.mark.asyncio
    async def test_kill_stops_at_once_and_twice_is_harmless(self, harness: ConformanceHarness) -> None:
        runtime = harness.runtime()
        _, info = await harness.started(runtime)
        await runtime.kill(info.state)
        stopped = await harness.stopped(runtime, info.state)
        await runtime.kill(stopped.state)
        status = (await runtime.inspect(stopped.state)).status
        assert status in STOPPED, f"a killed node inspects as {status}"

    @pytest.mark.asyncio
    async def test_remove_leaves_nothing_and_a_gone_node_is_not_found(
        self, harness: ConformanceHarness
    ) -> None:
        runtime = harness.runtime()
        _, running = await harness.started(runtime)
        _, created = await harness.create(runtime)
        for info in (running, created):
            await runtime.remove(info.state)
            left = await harness.tier.leftovers(runtime, info)
            assert left == [], f"remove left behind: {left}"
            with pytest.raises(NodeNotFound):
                await runtime.inspect(info.state)
            with pytest.raises(NodeNotFound):
                await runtime.start(info.state)
            for call in (runtime.stop(info.state, 0), runtime.kill(info.state)):
                with contextlib.suppress(NodeNotFound):  # gone: NodeNotFound or nothing to do
                    await call
            await runtime.remove(info.state)  # already gone counts as done
        listed = await runtime.list(harness.manager_id)
        assert listed == [], f"removed nodes still listed: {listed}"

    @pytest.mark.asyncio
    async def test_state_survives_json_and_a_new_runtime(self, harness: ConformanceHarness) -> None:
        """What the record keeps (the state as JSON) lets a restarted manager drive the node."""
        first = harness.runtime()
        spec, info = await harness.started(first)
        await harness.write(info, spec, "kept.txt", "across managers\n")
        state = json.loads(json.dumps(info.state))
        await first.aclose()

        second = harness.runtime()
        again = await harness.ready(second, state)
        got = (again.node_id, again.host, again.port)
        assert got == (spec.node_id, info.host, info.port), f"the new runtime sees {got}"
        listed = await second.list(harness.manager_id)
        assert [(i.node_id, i.running) for i in listed] == [(spec.node_id, True)], f"listed: {listed}"
        assert await harness.read(again, spec, "kept.txt") == "across managers\n"
        again = await harness.stop_and_start(second, state)
        state = again.state
        assert await harness.read(again, spec, "kept.txt") == "across managers\n", "start lost the workspace"
        await second.remove(state)
        left = await harness.tier.leftovers(second, again)
        assert left == [], f"remove left behind: {left}"
        with pytest.raises(NodeNotFound):
            await second.inspect(state)

    # ---- optional capabilities: a runtime without one is skipped, naming it --------------------------

    @staticmethod
    def _needs(runtime: Runtime, capability: str) -> None:
        if capability not in runtime.capabilities:
            pytest.skip(f"the {runtime.name} runtime has no {capability!r} capability")

    @pytest.mark.asyncio
    async def test_pause_freezes_and_resume_thaws_it(self, harness: ConformanceHarness) -> None:
        runtime = harness.runtime()
        self._needs(runtime, "pause")
        spec, info = await harness.started(runtime)
        await harness.write(info, spec, "kept.txt", "through a pause\n")
        paused = await runtime.pause(info.state)
        assert paused.status == PAUSED, f"a paused node reports {paused.status}"
        assert (await runtime.inspect(info.state)).status == PAUSED
        listed = {i.node_id: i.status for i in await runtime.list(harness.manager_id)}
        assert listed == {spec.node_id: PAUSED}, f"listed: {listed}"
        await runtime.pause(info.state)  # twice is harmless
        resumed = await runtime.resume(info.state)
        assert resumed.status == RUNNING, f"a resumed node reports {resumed.status}"
        info = await harness.ready(runtime, resumed.state)
        assert await harness.read(info, spec, "kept.txt") == "through a pause\n"
        await runtime.resume(info.state)  # resuming a running node is a no-op
        await runtime.pause(info.state)
        await runtime.remove(info.state)  # a paused node is removed like any other
        left = await harness.tier.leftovers(runtime, info)
        assert left == [], f"remove left behind: {left}"

    @pytest.mark.asyncio
    async def test_fork_makes_a_node_from_a_copy_of_the_workspace(self, harness: ConformanceHarness) -> None:
        runtime = harness.runtime()
        self._needs(runtime, "fork")
        spec, source = await harness.started(runtime)
        await harness.write(source, spec, "dir/forked.txt", "copied\n")
        new_spec = harness.spec()
        forked = await runtime.fork(source.state, new_spec)
        harness.states.append(forked.state)
        assert forked.node_id == new_spec.node_id and forked.status == CREATED, f"fork gave {forked}"
        json.dumps(forked.state)
        forked = await runtime.start(forked.state)
        forked = await harness.ready(runtime, forked.state)
        assert await harness.read(forked, new_spec, "dir/forked.txt") == "copied\n"
        await harness.write(forked, new_spec, "dir/forked.txt", "changed in the fork\n")
        assert await harness.read(source, spec, "dir/forked.txt") == "copied\n", "the fork changed its source"
        for info in (forked, source):
            await runtime.remove(info.state)
            left = await harness.tier.leftovers(runtime, info)
            assert left == [], f"remove left behind: {left}"
