"""Two manager replicas on one PostgreSQL database (issue 15): kill -9 of one while clients work,
PostgreSQL restarted under both, and a rolling restart under load. The client plays the load
balancer: a request that could not connect to one replica goes to the other."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.cluster_support import TICK, Cluster, calc, cluster
from tests.support import ManagerProcess, wait_until

pytestmark = pytest.mark.postgres

#: Adoption must come within three checker intervals of the death (the lease is two); one more is
#: allowed for a loaded machine.
ADOPTION_BOUND = 4 * TICK


class Balancer:
    """Client traffic over the replicas: round robin, and the next replica on a refused connection
    (what nginx does for any request that never reached an upstream)."""

    def __init__(self, replicas: list[ManagerProcess]) -> None:
        self.replicas = replicas
        self._next = itertools.count()
        self.cookies: list[str] = []
        self.failures: list[str] = []
        #: requests whose connection broke before the answer (in flight on a replica that died)
        self.broken: list[str] = []
        self.requests = 0
        self._stop = threading.Event()

    def send(self, path: str, cookie: str | None = None) -> httpx.Response | None:
        """One request; None when no replica could be connected to."""
        start = next(self._next)
        for i in range(len(self.replicas) * 3):
            url = self.replicas[(start + i) % len(self.replicas)].url
            headers = {"Cookie": f"node_id={cookie}"} if cookie else {}
            body = {"tool_name": "calculator", "arguments": {"expression": "6*7"}} if cookie else None
            try:
                return httpx.post(url + path, json=body, headers=headers, timeout=60, trust_env=False)
            except httpx.ConnectError:
                time.sleep(0.05)
            except httpx.HTTPError as exc:
                self.broken.append(f"{path} on {url}: {type(exc).__name__}")
                return None
        return None

    def work(self, sessions: int) -> None:
        """Create up to ``sessions`` sessions and call a tool in every one of them, until stopped."""
        while not self._stop.is_set():
            if len(self.cookies) < sessions:
                r = self.send("/get_cookie")
                if r is not None and r.status_code == 200:
                    self.cookies.append(r.cookies["node_id"])
            for cookie in list(self.cookies):
                broken = len(self.broken)
                r = self.send("/execute_tool", cookie)
                self.requests += 1
                if r is None and len(self.broken) > broken:
                    continue
                if r is None or r.status_code != 200 or r.json() != 42:
                    self.failures.append(
                        f"{cookie[:8]}: {r.status_code if r else 'no replica'} {r and r.text}"
                    )

    def __enter__(self) -> Balancer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, sessions: int) -> Balancer:
        self._thread = threading.Thread(target=self.work, args=(sessions,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if hasattr(self, "_thread"):
            self._thread.join(60)


def _owners(c: Cluster) -> dict[str, str]:
    return {r["id"]: r["manager_id"] for r in c.records()}


def test_kill9_of_a_replica_loses_no_session_and_its_nodes_are_adopted(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        a, b = c.replica(), c.replica()
        with Balancer([a, b]).start(sessions=8) as lb:
            wait_until(
                lambda: sum(m == a.manager_id for m in _owners(c).values()) >= 3,
                timeout=120,
                what="A's sessions",
            )
            assert a.proc is not None
            a.proc.kill()
            a.proc.wait(10)
            killed = time.monotonic()
            wait_until(
                lambda: a.manager_id not in _owners(c).values(), timeout=30, interval=0.05, what="adoption"
            )
            took = time.monotonic() - killed
            wait_until(lambda: len(lb.cookies) >= 8, timeout=120, what="the client's sessions")
            time.sleep(TICK * 2)  # the client keeps using them after the adoption
        print(
            f"\n[cluster] kill -9 of a replica: its nodes adopted after {took:.2f} s ({lb.requests} requests)"
        )
        assert took <= ADOPTION_BOUND, f"adopted after {took:.2f} s\n{b.tail(30)}"
        assert not lb.failures, lb.failures[:5]
        assert len(lb.broken) <= 1, lb.broken  # the one request in flight on A when it died, if any
        owners = _owners(c)
        lost = [k[:8] for k in lb.cookies if k not in owners]
        assert not lost, f"lost sessions {lost}\n{b.tail(30)}"
        assert set(owners.values()) == {b.manager_id}
        assert c.leases()[a.manager_id]["adopted_by"] == b.manager_id
        c.wait_clean(within=TICK * 6)  # the creates A had in flight are removed by B
        for cookie in lb.cookies:
            assert calc(b.url, cookie).json() == 42


def test_postgres_restarted_under_two_replicas_both_recover_and_none_adopts(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        a, b = c.replica(), c.replica()
        lb = Balancer([a, b])
        before = [lb.send("/get_cookie") for _ in range(4)]
        cookies = [r.cookies["node_id"] for r in before if r is not None]
        owners = _owners(c)
        assert len(cookies) == 4 and set(owners.values()) == {a.manager_id, b.manager_id}
        c.server.stop()
        time.sleep(TICK * 6)  # three leases: every lease has expired by the time it is back
        c.server.start()
        for m in (a, b):  # each replica takes new sessions again
            r = wait_until(
                lambda m=m: (x := httpx.post(m.url + "/get_cookie", timeout=60)).status_code == 200 and x,
                timeout=30,
                interval=0.2,
                what=f"{m.manager_id} serving new sessions",
            )
            cookies.append(r.cookies["node_id"])
        time.sleep(TICK * 6)  # long enough for an adoption to have happened, had one been due
        leases = c.leases()
        assert all(leases[m.manager_id]["adopted_by"] is None for m in (a, b)), leases
        after = _owners(c)
        assert {k: after[k] for k in owners} == owners, "a replica adopted the nodes of a live one"
        for cookie in cookies:
            for m in (a, b):
                assert calc(m.url, cookie).json() == 42
        c.wait_clean(within=TICK * 4)


def test_rolling_restart_under_load_loses_no_session_and_fails_no_request(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        a, b = c.replica(), c.replica()
        with Balancer([a, b]).start(sessions=6) as lb:
            wait_until(lambda: len(lb.cookies) >= 6, timeout=120, what="sessions")
            for replica in (a, b):
                assert replica.stop(), replica.tail(30)  # graceful: requests in flight finish
                # its lease ends with it: the other replica's checker takes its nodes over at once
                handed = lambda r=replica: r.manager_id not in _owners(c).values()  # noqa: E731
                wait_until(handed, timeout=TICK * 3 + 2, interval=0.05, what="its nodes handed over")
                replica.start()
                time.sleep(TICK * 4)
            served = lb.requests
        print(f"\n[cluster] rolling restart: {served} requests, {len(lb.failures)} failed")
        assert not lb.failures and not lb.broken, (lb.failures + lb.broken)[:5]
        owners = _owners(c)
        assert all(k in owners for k in lb.cookies), "a session was lost"
        for cookie in lb.cookies:
            assert calc(a.url, cookie).json() == 42 and calc(b.url, cookie).json() == 42
        c.wait_clean(within=TICK * 4)
