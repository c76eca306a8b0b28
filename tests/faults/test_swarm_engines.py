"""Two replicas on a two-engine swarm (issue 15): nodes land on both engines, each session is served
through either replica; a worker engine stopped: its nodes are reported down within two ticks of
Swarm marking it down, and reconnect places them on the other engine.

Bounded (about two minutes, most of it copying the node image to the second engine) but it makes
a second dockerd: it runs only with ``-m two_engines`` (``make bench`` runs it), see README."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.cluster_support import TICK, calc, cluster, cookie_of
from tests.support import wait_until
from tests.swarm_engines import two_engine_swarm, why_not
from toolserver.runtimes.base import LABEL_MANAGER
from toolserver.testing.tiers import docker_unavailable_reason, node_image

pytestmark = [
    pytest.mark.docker,
    pytest.mark.swarm,
    pytest.mark.postgres,
    pytest.mark.two_engines,
    pytest.mark.timeout(900),
]


def test_two_engines_served_by_either_replica_and_placed_again_when_one_stops(
    tmp_path: Path,
) -> None:
    reason = docker_unavailable_reason() or why_not()
    if reason:
        pytest.skip(reason)
    with two_engine_swarm(node_image()) as engine2, cluster(tmp_path) as c:
        config = {
            "isolation": "swarm",
            "runtime_config": {"image": node_image(), "placement_preferences": ["node.id"]},
        }
        a, b = c.replica(**config), c.replica(**config)
        try:
            cookies = [cookie_of((a, b)[i % 2].url, timeout=120) for i in range(4)]
            hosts = {r["ip"] for r in c.records()}
            assert hosts == {engine2.host_address, engine2.address}, hosts
            for cookie in cookies:
                assert calc(a.url, cookie).json() == 42 and calc(b.url, cookie).json() == 42
            on_second = {r["id"] for r in c.records() if r["ip"] == engine2.address}

            engine2.stop()
            state = ["docker", "node", "inspect", "-f", "{{.Status.State}}", engine2.swarm_node]
            down = lambda: subprocess.run(state, capture_output=True, text=True).stdout.strip() == "down"  # noqa: E731
            wait_until(down, timeout=60, interval=0.1, what="swarm marks the stopped engine down")
            marked = time.monotonic()
            gone = lambda: all(r["status"] == "exited" for r in c.records() if r["id"] in on_second)  # noqa: E731
            wait_until(gone, timeout=30, interval=0.05, what="its nodes reported down")
            took = time.monotonic() - marked
            print(
                f"\n[two engines] nodes of the stopped engine reported down {took:.2f} s after Swarm's mark"
            )
            assert took <= 3 * TICK, f"reported {took:.2f} s after the engine was marked down"
            details = [r["detail"] for r in c.records() if r["id"] in on_second]
            assert all("is down" in (d or "") for d in details), details

            for cookie in on_second:
                headers = {"Cookie": f"node_id={cookie}"}
                r = httpx.post(b.url + "/reconnect_session", headers=headers, timeout=120)
                assert r.status_code == 200, r.text
                assert calc(a.url, cookie).json() == 42
            assert {r["ip"] for r in c.records()} == {engine2.host_address}
        finally:
            for cookie in [r["id"] for r in c.records()]:
                httpx.post(a.url + "/release_session", headers={"Cookie": f"node_id={cookie}"}, timeout=60)
            for m in (a, b):
                label = f"label={LABEL_MANAGER}={m.manager_id}"
                ids = subprocess.run(
                    ["docker", "service", "ls", "-q", "--filter", label], capture_output=True, text=True
                )
                for sid in ids.stdout.split():
                    subprocess.run(["docker", "service", "rm", sid], capture_output=True)
