"""Replicated managers for the cluster tests: two or more real manager processes, one PostgreSQL
database, one data directory (process nodes on this host, reachable from every replica)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.support import ManagerProcess, PostgresServer, node_processes, wait_until
from toolserver.testing import node_of

CALC = {"tool_name": "calculator", "arguments": {"expression": "6*7"}}
#: Checker interval of the replicas; the lease lasts two of them, adoption comes within three.
TICK = 0.5


def cookie_of(url: str, timeout: float = 60) -> str:
    """A new session's cookie from the manager at ``url`` (AssertionError with the answer otherwise)."""
    r = httpx.post(url + "/get_cookie", timeout=timeout, trust_env=False)
    assert r.status_code == 200, r.text
    return str(r.cookies["node_id"])


def calc(url: str, cookie: str, timeout: float = 30) -> httpx.Response:
    """A tool call of session ``cookie`` through the manager at ``url``."""
    headers = {"Cookie": f"node_id={cookie}"}
    return httpx.post(url + "/execute_tool", json=CALC, headers=headers, timeout=timeout, trust_env=False)


class Cluster:
    """Replicas made by :meth:`replica` share ``server``'s database and one data directory."""

    def __init__(self, root: Path, server: PostgresServer) -> None:
        self.root = root
        self.server = server
        self.data_dir = root / "shared-data"
        self.replicas: list[ManagerProcess] = []

    def replica(self, start: bool = True, **config: Any) -> ManagerProcess:
        n = len(self.replicas)
        node = {"health_check_interval": TICK, "on_shutdown": "keep", **config.pop("node", {})}
        # the process tier: this harness finds a replica's nodes by their processes and marks
        config.setdefault("isolation", "process")
        manager = ManagerProcess(
            self.root / f"replica{n}",
            database_url=self.server.url,
            data_dir=str(self.data_dir),
            node=node,
            **config,
        )
        manager.config["manager_id"] = f"replica{n}-{manager.manager_id}"
        manager.config_path.write_text(__import__("yaml").safe_dump(manager.config))
        self.replicas.append(manager)
        return manager.start() if start else manager

    def records(self, where: str = "TRUE", *args: Any) -> list[dict[str, Any]]:
        return self.server.rows(f"SELECT * FROM toolserver_nodes WHERE {where}", *args)

    def leases(self) -> dict[str, dict[str, Any]]:
        return {r["manager_id"]: r for r in self.server.rows("SELECT * FROM manager_leases")}

    def node_processes(self) -> list[psutil.Process]:
        return node_processes(self.data_dir)

    def node_dirs(self) -> list[str]:
        root = self.data_dir / "nodes"
        return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.exists() else []

    def leaks(self) -> list[str]:
        """Node directories and node servers without a session record, and records without a node."""
        records = {r["short_id"]: r for r in self.records()}
        found = [f"record {s} is {r['ownership']}" for s, r in records.items() if r["ownership"] != "session"]
        found += [f"directory {d} has no record" for d in self.node_dirs() if d not in records]
        running = set()
        for proc in self.node_processes():
            with contextlib.suppress(psutil.Error):
                mark = node_of(proc) or "?"
                if "node" in proc.cmdline():
                    running.add(mark)
                if mark not in records:
                    found.append(f"process {proc.pid} of node {mark} has no record")
        dirs = set(self.node_dirs())
        for sid, r in records.items():
            if sid not in dirs:
                found.append(f"record {sid} has no node")
            elif (r["status"] == "running") != (sid in running):
                found.append(f"record {sid} says {r['status']}")
        return found

    def wait_clean(self, within: float) -> None:
        last: list[list[str]] = [[]]

        def clean() -> bool:
            last[0] = self.leaks()
            return not last[0]

        try:
            wait_until(clean, timeout=within, interval=0.1, what="no leak")
        except AssertionError as exc:
            tails = "\n".join(m.tail(20) for m in self.replicas)
            raise AssertionError(f"{exc}; still leaking: {last[0]}\n{tails}") from None

    def close(self) -> None:
        for manager in reversed(self.replicas):
            manager.stop()
        for proc in self.node_processes():
            with contextlib.suppress(psutil.Error):
                proc.kill()


@contextlib.contextmanager
def cluster(root: Path) -> Iterator[Cluster]:
    """A PostgreSQL server and a :class:`Cluster` on it; everything removed on the way out."""
    server = PostgresServer()
    server.start()
    made = Cluster(root, server)
    try:
        yield made
    finally:
        made.close()
        server.remove()
