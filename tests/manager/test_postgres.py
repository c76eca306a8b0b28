"""PostgreSQL is a URL change: migrations, the session lifecycle and the pool claim on a real server."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import ManagerProcess, free_port, wait_until
from toolserver.client import ToolServerClient
from toolserver.manager.models import ToolServerNode, utcnow
from toolserver.manager.store import open_store

pytestmark = pytest.mark.postgres

PG_BIN = Path("/usr/lib/postgresql")


def _pg_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(PG_BIN.glob(f"*/bin/{name}")) if PG_BIN.exists() else []
    return str(versions[-1]) if versions else None


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server on 127.0.0.1, run as the postgres user when we are root."""
    initdb, pg_ctl = _pg_tool("initdb"), _pg_tool("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="toolserver-pg-"))  # not under pytest's 0700 tree
    data = root / "data"
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run(
        [*as_user, initdb, "-D", str(data), "-U", "toolserver", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *as_user,
            pg_ctl,
            "-D",
            str(data),
            "-l",
            str(root / "pg.log"),
            "-w",
            "start",
            "-o",
            f"-h 127.0.0.1 -p {port} -k {root}",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+asyncpg://toolserver@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


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
        won = [c.id for c in claims if c is not None]
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
