"""Replicated managers on one PostgreSQL database: any replica answers any session, limits hold for
the cluster, and a replica's lease is what its liveness is."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.cluster_support import TICK, calc, cluster, cookie_of
from tests.support import wait_until
from toolserver.testing import node_of

pytestmark = pytest.mark.postgres


def test_a_session_made_on_one_replica_is_served_and_released_through_the_other(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        a, b = c.replica(), c.replica()
        cookie = cookie_of(a.url)
        r = calc(b.url, cookie)
        assert r.status_code == 200 and r.json() == 42
        headers = {"Cookie": f"node_id={cookie}"}
        assert httpx.post(b.url + "/close_session", headers=headers, timeout=30).status_code == 200
        assert calc(a.url, cookie).status_code == 503  # stopped, whoever is asked
        assert httpx.post(a.url + "/reconnect_session", headers=headers, timeout=60).status_code == 200
        assert calc(b.url, cookie).json() == 42
        assert httpx.post(b.url + "/release_session", headers=headers, timeout=30).status_code == 200
        assert calc(a.url, cookie).status_code == 403
        wait_until(lambda: not c.node_dirs() and not c.node_processes(), timeout=10, what="node removed")
        # both replicas hold a live lease, and neither adopted the other
        leases = c.leases()
        assert set(leases) == {a.manager_id, b.manager_id}
        assert all(row["adopted_by"] is None for row in leases.values())


def test_every_replica_lists_every_session_and_an_admin_acts_on_any(tmp_path: Path) -> None:
    """Behind a load balancer a list must not depend on the replica that answered it."""
    with cluster(tmp_path) as c:
        a, b = c.replica(), c.replica()
        cookies = {cookie_of(a.url): a.manager_id, cookie_of(b.url): b.manager_id}
        short = {r["id"]: r["short_id"] for r in c.records()}
        for url in (a.url, b.url):
            listed = httpx.get(url + "/sessions", timeout=30).json()["sessions"]
            assert {s["session_id"] for s in listed} == set(cookies)
            rows = httpx.get(url + "/admin/sessions", timeout=30).json()
            assert {r["short_id"]: r["manager_id"] for r in rows} == {short[k]: m for k, m in cookies.items()}
            only_a = httpx.get(url + "/admin/sessions", params={"manager": a.manager_id}, timeout=30).json()
            assert [r["manager_id"] for r in only_a] == [a.manager_id]
        made_on_a = next(k for k, m in cookies.items() if m == a.manager_id)
        r = httpx.get(f"{b.url}/admin/sessions/{short[made_on_a]}", timeout=30)
        assert r.status_code == 200 and r.json()["manager_id"] == a.manager_id
        r = httpx.post(f"{b.url}/admin/sessions/{short[made_on_a]}/release", timeout=60)
        assert r.status_code == 200, r.text
        assert calc(a.url, made_on_a).status_code == 403
        assert [r["manager_id"] for r in c.records()] == [b.manager_id]
        kept = [short[k] for k, m in cookies.items() if m == b.manager_id]
        wait_until(lambda: c.node_dirs() == kept, timeout=10, what="the released node removed")


def test_cluster_max_nodes_counts_every_replica(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        a = c.replica(cluster={"max_nodes": 2})
        b = c.replica(cluster={"max_nodes": 2})
        cookie_of(a.url)
        cookie_of(b.url)
        for url in (a.url, b.url):
            r = httpx.post(url + "/get_cookie", timeout=60)
            assert r.status_code == 429
            assert "cluster.max_nodes = 2" in r.json()["detail"] and r.headers["retry-after"]
        assert len(c.records()) == 2


def test_a_stopped_replica_hands_its_nodes_to_a_live_one_and_does_not_take_them_back(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        a, b = c.replica(), c.replica()
        cookies = [cookie_of(a.url) for _ in range(2)]
        assert a.stop()  # graceful, node.on_shutdown: keep: its lease ends at once
        wait_until(
            lambda: {r["manager_id"] for r in c.records()} == {b.manager_id},
            timeout=TICK * 3 + 2,
            what="B adopts A's nodes",
        )
        assert {r["origin"] for r in c.records()} == {a.manager_id}
        a.start()
        new = cookie_of(a.url)
        renewed = lambda: c.leases()[a.manager_id]["adopted_by"] is None  # noqa: E731
        wait_until(renewed, timeout=5, what="A's lease renewed")
        by_manager = {r["id"]: r["manager_id"] for r in c.records()}
        assert by_manager == {cookies[0]: b.manager_id, cookies[1]: b.manager_id, new: a.manager_id}
        # the adopter's checker keeps them true: a node killed behind its back is seen as dead
        victim = next(r for r in c.records() if r["id"] == cookies[0])
        for proc in c.node_processes():
            if node_of(proc) == victim["short_id"]:
                proc.kill()
        dead = lambda: c.records("id = $1", cookies[0])[0]["status"] == "exited"  # noqa: E731
        wait_until(dead, timeout=TICK * 4 + 2, what="the adopter sees the node die")
        for cookie in (cookies[1], new):  # the others still serve through either replica
            assert calc(a.url, cookie).json() == 42 and calc(b.url, cookie).json() == 42
        c.wait_clean(within=TICK * 4)
