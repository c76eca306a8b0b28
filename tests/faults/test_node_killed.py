"""A node killed while a background shell job runs: its requests answer 503 within a second (none
hangs), the job dies with it, and no descriptor of the node server had reached the job."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.faults.harness import (
    CALC,
    TICK,
    FaultManager,
    fault_managers,
    fds_of,
    recovered,
    session_headers,
    tier_params,
)
from tests.support import wait_until
from toolserver.testing import node_of
from toolserver.testing.tiers import Tier

SHELL = "shell_command_executor"


def _node_server(manager: FaultManager, short_id: str) -> psutil.Process:
    for proc in manager.processes():
        if node_of(proc) == short_id and "node" in proc.cmdline():
            return proc
    raise AssertionError(f"no node server for {short_id}")


def _job(manager: FaultManager, short_id: str) -> psutil.Process:
    for proc in manager.processes():
        if node_of(proc) == short_id and proc.cmdline() == ["sleep", "300"]:
            return proc
    raise AssertionError(f"no shell job of {short_id}")


def _kill_node(manager: FaultManager, short_id: str) -> None:
    if manager.docker:
        name = f"toolserver-node-{short_id}"
        subprocess.run(
            ["docker", "kill", "--signal", "KILL", name], check=True, capture_output=True, timeout=60
        )
    else:
        _node_server(manager, short_id).send_signal(signal.SIGKILL)


@pytest.mark.parametrize("tier", tier_params())
def test_killed_node_answers_503_at_once_and_takes_its_jobs_along(tmp_path: Path, tier: Tier) -> None:
    with fault_managers(tmp_path) as make:
        manager = make(tier)
        http = httpx.Client(base_url=manager.url, trust_env=False, timeout=30)
        cookie = http.post("/get_cookie").cookies["node_id"]
        cookies = session_headers(cookie)
        short_id = manager.node(cookie)["short_id"]
        job = {"tool_name": SHELL, "arguments": {"command": "sleep 300", "run_async": True}}
        assert http.post("/execute_tool", json=job, headers=cookies).status_code == 200
        if not manager.docker:  # the job holds nothing of the node server: no socket, no file
            server, sleeper = _node_server(manager, short_id), _job(manager, short_id)
            shared = set(fds_of(server.pid).values()) & set(fds_of(sleeper.pid).values())
            assert not shared, f"the shell job holds descriptors of the node server: {shared}"
        # a request under way when the node dies
        slow = {"tool_name": SHELL, "arguments": {"command": "sleep 30", "timeout": 60}}
        in_flight: list[float] = []

        def slow_call() -> None:
            r = http.post("/execute_tool", json=slow, headers=cookies)
            in_flight.append(r.status_code)
            in_flight.append(time.monotonic())

        caller = threading.Thread(target=slow_call)
        caller.start()
        time.sleep(1.0)
        killed = time.monotonic()
        _kill_node(manager, short_id)

        caller.join(10)
        assert not caller.is_alive(), "the request under way hangs"
        assert in_flight[0] == 503 and in_flight[1] - killed < 1.0, in_flight
        answers = []
        for _ in range(3):  # before and after the checker has seen the death
            started = time.monotonic()
            r = http.post("/execute_tool", json=CALC, headers=cookies, timeout=5)
            answers.append(time.monotonic() - started)
            assert r.status_code == 503, r.text
            assert answers[-1] < 1.0
            time.sleep(TICK)
        print(
            f"\n[recovery] {tier.name} node killed: the request under way got 503 after "
            f"{in_flight[1] - killed:.3f} s, new requests after {max(answers):.3f} s at most"
        )
        if not manager.docker:
            wait_until(
                lambda: not _jobs_alive(manager, short_id), timeout=3 * TICK, what="the shell job gone"
            )
        wait_until(
            lambda: manager.node(cookie)["status"] == "exited", timeout=5, what="the record says exited"
        )
        recovered(manager, within=TICK * 2)
        # the session comes back
        assert http.post("/reconnect_session", headers=cookies).status_code == 200
        assert http.post("/execute_tool", json=CALC, headers=cookies).json() == 42
        assert http.post("/release_session", headers=cookies).status_code == 200
        http.close()
        recovered(manager, within=TICK * 2)


def _jobs_alive(manager: FaultManager, short_id: str) -> bool:
    for proc in manager.processes():
        with contextlib.suppress(psutil.Error):
            if node_of(proc) == short_id:
                return True
    return False
