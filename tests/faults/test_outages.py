"""Outages under live sessions: PostgreSQL restarted, the SQLite file and the data directory made
unwritable (``chattr +i``: as root ``chmod`` stops nothing), dockerd restarted. Clients get clear
503s where work needs what is down, sessions whose routes are known keep working, nothing is
lost, and everything recovers by itself."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.faults.harness import (
    CALC,
    TICK,
    FaultManager,
    fault_managers,
    recovered,
    session_headers,
)
from tests.support import PostgresServer, wait_until
from toolserver.manager.sessions import ROUTE_TTL
from toolserver.testing.tiers import DOCKER, PROCESS

REPO = Path(__file__).resolve().parents[2]
READ = "FileSystemEnv_read_from_file"
WRITE = "FileSystemEnv_write_to_file"


def _call(http: httpx.Client, node_id: str, tool: dict[str, object] = CALC) -> httpx.Response:
    return http.post("/execute_tool", json=tool, headers=session_headers(node_id))


def _new_session(http: httpx.Client) -> str:
    r = http.post("/get_cookie")
    assert r.status_code == 200, r.text
    return r.cookies["node_id"]


def _unavailable(r: httpx.Response, words: str) -> None:
    assert r.status_code == 503, r.text
    assert words in r.json()["detail"], r.text


@contextlib.contextmanager
def immutable(*paths: Path) -> Iterator[None]:
    """``chattr +i`` on ``paths`` for the block, undone whatever happens."""
    try:
        subprocess.run(["chattr", "+i", *map(str, paths)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"chattr +i does not work here: {exc}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *map(str, paths)], capture_output=True)


def test_postgres_restart_under_live_sessions(tmp_path: Path) -> None:
    grace = 4.0
    server = PostgresServer()
    server.start()
    try:
        with fault_managers(tmp_path) as make:
            manager = make(PROCESS, database_url=server.url, database_outage_grace_seconds=grace)
            http = httpx.Client(base_url=manager.url, trust_env=False, timeout=30)
            known, unknown = _new_session(http), _new_session(http)
            time.sleep(ROUTE_TTL + 0.2)  # the routes cached at the hand-over have expired
            assert _call(http, known).json() == 42  # this manager has read its route

            server.stop()
            down = time.monotonic()
            assert _call(http, known).json() == 42  # served from the known route
            _unavailable(_call(http, unknown), "database unavailable")
            _unavailable(http.post("/get_cookie"), "database unavailable")
            _unavailable(
                http.post("/release_session", headers=session_headers(known)), "database unavailable"
            )
            assert http.get("/alive").status_code == 200
            wait_until(lambda: time.monotonic() - down > grace, timeout=grace + 1)
            _unavailable(_call(http, known), "database unavailable")  # the grace is bounded

            server.start()
            back = time.monotonic()
            wait_until(lambda: _call(http, known).status_code == 200, timeout=20, what="serving again")
            print(f"\n[recovery] postgres restart: serving again {time.monotonic() - back:.2f} s after")
            assert _call(http, unknown).json() == 42
            extra = _new_session(http)
            for node_id in (known, unknown, extra):
                assert http.post("/release_session", headers=session_headers(node_id)).status_code == 200
            wait_until(lambda: manager.processes() == [], timeout=10, what="every node gone")
            assert manager.node_dirs() == []
            assert "Traceback" not in manager.log()
    finally:
        server.remove()


def test_postgres_outage_with_api_keys_keeps_known_keys_and_sessions(tmp_path: Path) -> None:
    """With keys, a known session keeps working through an outage as without them: the key's
    check is trusted for the outage grace as its route is (it used to fail once the key's 1 s cache
    ran out); a key never seen before gets the outage's 503, not a 401."""
    grace = 4.0
    server = PostgresServer()
    server.start()
    try:
        with fault_managers(tmp_path) as make:
            manager = make(
                PROCESS,
                database_url=server.url,
                database_outage_grace_seconds=grace,
                auth="api_keys",
                key_cache_seconds=1,
            )

            def key(name: str) -> str:
                argv = [sys.executable, "-m", "toolserver", "keys", "--config", str(manager.config_path)]
                done = subprocess.run(
                    [*argv, "create", name, "--scope", "user"], capture_output=True, text=True, timeout=60
                )
                assert done.returncode == 0, done.stderr
                return done.stdout.strip()

            known_key, unseen_key = key("known"), key("unseen")
            http = httpx.Client(
                base_url=manager.url, trust_env=False, timeout=30, headers={"X-API-Key": known_key}
            )
            session = _new_session(http)
            time.sleep(max(ROUTE_TTL, 1) + 0.2)  # the key's and the route's caches have run out
            assert _call(http, session).json() == 42  # checked again, read again

            server.stop()
            down = time.monotonic()
            time.sleep(1.2)  # past key_cache_seconds
            assert _call(http, session).json() == 42
            unseen = {"X-API-Key": unseen_key, **session_headers(session)}
            r = http.post("/execute_tool", json=CALC, headers=unseen)
            _unavailable(r, "database unavailable")
            wait_until(lambda: time.monotonic() - down > grace, timeout=grace + 1)
            _unavailable(_call(http, session), "database unavailable")  # bounded, as for routes

            server.start()
            wait_until(lambda: _call(http, session).status_code == 200, timeout=20, what="serving again")
            assert http.post("/release_session", headers=session_headers(session)).status_code == 200
            wait_until(lambda: manager.processes() == [], timeout=10, what="every node gone")
            assert "Traceback" not in manager.log()
    finally:
        server.remove()


def test_sqlite_file_unwritable(tmp_path: Path) -> None:
    with fault_managers(tmp_path) as make:
        manager = make(PROCESS)
        http = httpx.Client(base_url=manager.url, trust_env=False, timeout=30)
        a, b = _new_session(http), _new_session(http)
        assert _call(http, a).json() == 42 and _call(http, b).json() == 42
        db = manager.db_path
        with immutable(db, db.with_name(db.name + "-wal")):
            time.sleep(2 * TICK)  # the checker and the activity flush meet the failing writes
            assert _call(http, a).json() == 42  # reading records still works
            _unavailable(http.post("/get_cookie"), "database unavailable")
            _unavailable(http.post("/release_session", headers=session_headers(b)), "database unavailable")
            assert _call(http, b).json() == 42  # the failed release changed nothing
            assert len(manager.processes()) == 2
        for node_id in (a, b):
            wait_until(lambda n=node_id: _call(http, n).status_code == 200, timeout=10, what="serving")
        extra = _new_session(http)
        for node_id in (a, b, extra):
            assert http.post("/release_session", headers=session_headers(node_id)).status_code == 200
        recovered(manager, within=TICK * 2)
        assert "Traceback" not in manager.log()


def test_data_directory_unwritable(tmp_path: Path) -> None:
    with fault_managers(tmp_path) as make:
        manager = make(PROCESS)
        http = httpx.Client(base_url=manager.url, trust_env=False, timeout=30)
        a, b = _new_session(http), _new_session(http)
        short_b = manager.node(b)["short_id"]
        with immutable(manager.data_dir / "nodes"):
            _unavailable(http.post("/get_cookie"), "cannot create node directory")
            assert len(manager.records()) == 2  # the failed create left no record
            note = "put it in the file"
            write = {"tool_name": WRITE, "arguments": {"filepath": "a.txt", "content": note}}
            assert _call(http, a, write).status_code == 200  # a session's own workspace stays writable
            r = http.post("/release_session", headers=session_headers(b))
            _unavailable(r, "cannot delete node directory")
            assert "removed as soon as" in r.json()["detail"]
            assert manager.node(b)["ownership"] == "releasing"
            assert _call(http, b).status_code == 403  # released: the cookie is gone
            assert (manager.data_dir / "nodes" / short_b).exists()
        restored = time.monotonic()
        wait_until(lambda: manager.node(b) is None, timeout=2 * TICK + 1, what="the release finished")
        took = time.monotonic() - restored
        print(f"\n[recovery] data dir writable again: release finished {took:.2f} s after")
        assert not (manager.data_dir / "nodes" / short_b).exists()
        read = {"tool_name": READ, "arguments": {"filepath": "a.txt"}}
        assert "put it in the file" in _call(http, a, read).text
        extra = _new_session(http)
        for node_id in (a, extra):
            assert http.post("/release_session", headers=session_headers(node_id)).status_code == 200
        recovered(manager, within=TICK * 2)
        assert "Traceback" not in manager.log()


def _dockerd() -> psutil.Process | None:
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] == "dockerd":
            return proc
    return None


def _start_dockerd() -> None:
    """Start dockerd as make test does (scripts/ensure-docker.sh: same flags, same log)."""
    subprocess.run(["bash", str(REPO / "scripts" / "ensure-docker.sh")], capture_output=True, timeout=180)


@pytest.mark.docker
@pytest.mark.restarts_dockerd
def test_dockerd_restart_under_live_sessions(tmp_path: Path) -> None:
    with fault_managers(tmp_path) as make:
        manager: FaultManager = make(DOCKER, node={"creation_wait_seconds": 60})
        daemon = _dockerd()
        if daemon is None:
            pytest.skip("dockerd does not run as a local process here; it cannot be restarted")
        http = httpx.Client(base_url=manager.url, trust_env=False, timeout=60)
        sessions = [_new_session(http) for _ in range(2)]
        for i, node_id in enumerate(sessions):
            write = {"tool_name": WRITE, "arguments": {"filepath": "kept.txt", "content": f"kept {i}"}}
            assert _call(http, node_id, write).status_code == 200
        try:
            daemon.terminate()
            during = http.post("/get_cookie")  # while the daemon stops its containers
            daemon.wait(90)
            if during.status_code != 200:
                _unavailable(during, "runtime unavailable")
            down = time.monotonic()
            for node_id in sessions:  # its node went down with the daemon
                assert _call(http, node_id).status_code == 503
            _unavailable(http.post("/get_cookie"), "runtime unavailable")
            time.sleep(2 * TICK)
        finally:
            _start_dockerd()
        up = time.monotonic()
        print(f"\n[recovery] dockerd down {up - down:.1f} s")
        wait_until(
            lambda: all(manager.node(n)["status"] == "exited" for n in sessions),
            timeout=30,
            what="records say the nodes stopped",
        )
        print(f"[recovery] dockerd back: records true {time.monotonic() - up:.2f} s after")
        read = {"tool_name": READ, "arguments": {"filepath": "kept.txt"}}
        for i, node_id in enumerate(sessions):
            assert http.post("/reconnect_session", headers=session_headers(node_id)).status_code == 200
            assert f"kept {i}" in _call(http, node_id, read).text  # the workspace survived
        extra = [_new_session(http)]
        if during.status_code == 200:  # created just before the daemon went: a session like the others
            extra.append(during.cookies["node_id"])
        for node_id in [*sessions, *extra]:
            assert http.post("/release_session", headers=session_headers(node_id)).status_code == 200
        recovered(manager, within=TICK * 2)
        log = manager.log()
        assert "Traceback" not in log
        assert log.count("skipping ticks during the runtime outage") == 1
