"""PostgreSQL is a URL change: migrations, the session lifecycle and the pool claim on a real server."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import ManagerProcess, PostgresServer, free_port, wait_until
from toolserver.client import ToolServerClient
from toolserver.manager.models import Ownership, ToolServerNode, utcnow
from toolserver.manager.store import KeyQuota, Store, open_store, this_process

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    server = PostgresServer()
    server.start()
    try:
        yield server.url
    finally:
        server.remove()


async def test_concurrent_claims_on_postgres_never_share_a_node(postgres_url: str) -> None:
    stores = [await open_store(postgres_url) for _ in range(3)]
    try:
        now = utcnow()
        await stores[0].delete_nodes([n.id for n in await stores[0].list_nodes("pg-pool")])
        for i in range(10):
            await stores[0].add_node(
                ToolServerNode(
                    id=f"pool-token-{i}",
                    short_id=f"pool{i}",
                    manager_id="pg-pool",
                    status="running",
                    health="healthy",
                    secret="s",
                    pooled=True,
                    ownership=Ownership.POOL,
                    runtime_state={},
                    last_req_time=now,
                    created_at=now,
                    status_changed_at=now,
                )
            )
        claims = await asyncio.gather(
            *(s.claim_pooled("pg-pool", "healthy", creator=this_process(), deadline=now) for s in stores * 5)
        )
        won = [node.id for node, _ in claims if node is not None]
        assert len(won) == 10 and len(set(won)) == 10
        assert await stores[0].count_pooled("pg-pool") == 0
    finally:
        for s in stores:
            await s.aclose()


async def test_replicas_started_together_on_a_new_database_all_migrate_it() -> None:
    """A stack starts its manager replicas at once: deployed, one of two died creating the tables
    the other was creating (UniqueViolation on alembic_version), until migrations took a lock."""
    server = await asyncio.to_thread(PostgresServer)
    await asyncio.to_thread(server.start)
    stores: list[Store] = []
    try:
        stores = [Store(server.url) for _ in range(4)]
        # without the lock they also deadlocked here: fail in a minute rather than hang
        await asyncio.wait_for(asyncio.gather(*(s.migrate() for s in stores)), 60)
        await asyncio.gather(*(s.ping() for s in stores))
        versions = await asyncio.to_thread(server.rows, "SELECT version_num FROM alembic_version")
        assert len(versions) == 1
        assert await stores[3].list_nodes(None) == []
    finally:
        for store in stores:
            await store.aclose()
        await asyncio.to_thread(server.remove)


def test_session_lifecycle_on_postgres(
    postgres_url: str, manager_factory: Callable[..., ManagerProcess]
) -> None:
    manager = manager_factory(database_url=postgres_url)
    with ToolServerClient(manager.url) as client, client.session() as session:
        tools = session.get_available_tools()
        assert tools["available_tools"]
        session.close()
        session.reconnect()
        assert session.get_available_tools()["available_tools"]
    wait_until(lambda: manager.node_processes() == [], timeout=10, what="node gone")


def test_database_outage_answers_503_and_the_manager_recovers(
    manager_factory: Callable[..., ManagerProcess],
) -> None:
    server = PostgresServer()
    server.start()
    try:
        manager = manager_factory(database_url=server.url)
        calc = {"tool_name": "calculator", "arguments": {"expression": "6*7"}}
        with ToolServerClient(manager.url) as client:
            session = client.get_cookie()
            cookie = {"Cookie": f"node_id={session.node_id}"}
            server.stop()
            time.sleep(1.5)  # past the route cache: the next request must read the record
            with httpx.Client(base_url=manager.url, trust_env=False, timeout=30) as http:
                for answer in (
                    http.post("/execute_tool", json=calc, headers=cookie),
                    http.post("/get_cookie"),
                ):
                    assert answer.status_code == 503, answer.text
                    assert answer.json()["detail"].startswith("database unavailable")
                    assert answer.headers["Retry-After"]
                assert http.get("/alive").status_code == 200
                server.start()
                # connections broken by the outage are replaced: the session works again
                wait_until(
                    lambda: http.post("/execute_tool", json=calc, headers=cookie).status_code == 200,
                    timeout=20,
                    what="the manager serving again",
                )
                assert http.post("/execute_tool", json=calc, headers=cookie).json() == 42
            # shutting down while the database is away still stops the node: the runtime knows it runs
            server.stop()
            assert manager.stop(), manager.tail(40)
            assert manager.node_processes() == []
    finally:
        server.remove()


async def test_max_nodes_is_atomic_across_stores_on_postgres(postgres_url: str) -> None:
    stores = [await open_store(postgres_url) for _ in range(3)]
    try:
        nodes = [ToolServerNode.new("pg-capacity", "process") for _ in range(15)]
        counts = await asyncio.gather(*(stores[i % 3].add_node_within(n, 5) for i, n in enumerate(nodes)))
        assert sorted(counts) == list(range(5)) + [5] * 10  # each insert saw the ones before it
        assert await stores[0].count_live_nodes("pg-capacity") == 5
        await stores[0].delete_nodes([n.id for n in nodes])
    finally:
        for s in stores:
            await s.aclose()


async def test_a_key_quota_is_atomic_across_stores_on_postgres(postgres_url: str) -> None:
    stores = [await open_store(postgres_url) for _ in range(3)]
    quota = KeyQuota("pgkey001", max_sessions=4, starts_per_minute=None)
    try:
        # three managers (their own manager ids, so node.max_nodes never binds) share one key
        nodes = [ToolServerNode.new(f"pg-quota-{i % 3}", "process", owner="pgkey001") for i in range(12)]
        admissions = await asyncio.gather(
            *(stores[i % 3].admit_node(n, 100, quota) for i, n in enumerate(nodes))
        )
        assert sum(a.admitted for a in admissions) == 4
        assert {a.refused_by for a in admissions if not a.admitted} == {"max_sessions"}
        assert await stores[0].count_live_owned("pgkey001") == 4
        await stores[0].delete_nodes([n.id for n in nodes])
    finally:
        for s in stores:
            await s.aclose()


def test_a_manager_started_before_its_database_waits_for_it_and_serves(
    manager_factory: Callable[..., ManagerProcess],
) -> None:
    """A stack starts its services in any order: the manager waits for PostgreSQL, then serves."""
    server = PostgresServer()
    starter = threading.Timer(3.0, server.start)
    try:
        manager = manager_factory(start=False, database_url=server.url, database_wait_seconds=60)
        starter.start()
        manager.start()
        assert "waiting up to 60 s for it" in manager.log()
        assert "Traceback" not in manager.log()
        with ToolServerClient(manager.url) as client, client.session() as session:
            assert session.execute_tool("calculator", {"expression": "6*7"}) == 42
    finally:
        starter.join()
        server.remove()


def test_a_database_that_never_answers_stops_the_manager_with_a_clear_error(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "TOOLSERVER_DATABASE_URL": f"postgresql+asyncpg://toolserver:s3cret@127.0.0.1:{free_port()}/postgres",
        "TOOLSERVER_DATABASE_WAIT_SECONDS": "1",
        "TOOLSERVER_DATA_DIR": str(tmp_path),
        "TOOLSERVER_PORT": str(free_port()),
    }
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "toolserver", "manager"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert time.monotonic() - started < 30
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "toolserver: cannot start the manager: postgresql+asyncpg://toolserver:***@127.0.0.1:"
    )
    assert "database unavailable" in last and "after 1 s" in last
    assert "Traceback" not in done.stderr and "s3cret" not in done.stderr


def test_a_sqlite_file_that_cannot_be_made_stops_the_manager_at_once(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    env = {**os.environ, "TOOLSERVER_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/file/sub/x.db"}
    env["TOOLSERVER_PORT"] = str(free_port())
    done = subprocess.run(
        [sys.executable, "-m", "toolserver", "manager"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert "cannot start the manager: sqlite+aiosqlite:///" in done.stderr
    assert "Not a directory" in done.stderr
    assert "Traceback" not in done.stderr
