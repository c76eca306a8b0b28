"""PostgreSQL is a URL change: migrations, the session lifecycle and the pool claim on a real server."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import ManagerProcess, free_port, wait_until
from toolserver.client import ToolServerClient
from toolserver.manager.models import ToolServerNode, utcnow
from toolserver.manager.store import KeyQuota, open_store

pytestmark = pytest.mark.postgres

PG_BIN = Path("/usr/lib/postgresql")


def _pg_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(PG_BIN.glob(f"*/bin/{name}")) if PG_BIN.exists() else []
    return str(versions[-1]) if versions else None


class PostgresServer:
    """A throwaway PostgreSQL server on 127.0.0.1, run as the postgres user when we are root."""

    def __init__(self) -> None:
        initdb, pg_ctl = _pg_tool("initdb"), _pg_tool("pg_ctl")
        if not (initdb and pg_ctl):
            pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
        self.pg_ctl = pg_ctl
        self.root = Path(tempfile.mkdtemp(prefix="toolserver-pg-"))  # not under pytest's 0700 tree
        self.data = self.root / "data"
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            shutil.chown(self.root, "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.port = free_port()
        self.url = f"postgresql+asyncpg://toolserver@127.0.0.1:{self.port}/postgres"
        subprocess.run(
            [*self.as_user, initdb, "-D", str(self.data), "-U", "toolserver", "--auth=trust", "-E", "UTF8"],
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        options = f"-h 127.0.0.1 -p {self.port} -k {self.root}"
        log = str(self.root / "pg.log")
        subprocess.run(
            [*self.as_user, self.pg_ctl, "-D", str(self.data), "-l", log, "-w", "start", "-o", options],
            check=True,
            capture_output=True,
        )

    def stop(self) -> None:
        subprocess.run(
            [*self.as_user, self.pg_ctl, "-D", str(self.data), "-m", "immediate", "stop"], capture_output=True
        )

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


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
                    runtime_state={},
                    last_req_time=now,
                    created_at=now,
                    status_changed_at=now,
                )
            )
        claims = await asyncio.gather(*(s.claim_pooled("pg-pool", "healthy") for s in stores * 5))
        won = [node.id for node, _ in claims if node is not None]
        assert len(won) == 10 and len(set(won)) == 10
        assert await stores[0].count_pooled("pg-pool") == 0
    finally:
        for s in stores:
            await s.aclose()


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
