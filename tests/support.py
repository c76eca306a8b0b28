"""Helpers shared by the test suites: free ports, waiting for HTTP, a real manager process."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Any, timeout: float = 30.0, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def processes_under(path: Path) -> list[psutil.Process]:
    """Live (non-zombie) processes whose command line mentions ``path``."""
    found = []
    needle = str(path)
    for proc in psutil.process_iter(["cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            if proc.info["status"] != psutil.STATUS_ZOMBIE and any(
                needle in part for part in proc.info["cmdline"] or []
            ):
                found.append(proc)
    return found


def node_processes(data_dir: Path) -> list[psutil.Process]:
    """Node processes (``toolserver node``) whose workspace is under ``data_dir``."""
    return [p for p in processes_under(data_dir) if "node" in p.cmdline()]


def marked_processes(short_id: str) -> list[psutil.Process]:
    """Processes carrying the process runtime's mark of node ``short_id`` in their environment."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if (
                proc.environ().get("TOOLSERVER_MARK_NODE") == short_id
                and proc.status() != psutil.STATUS_ZOMBIE
            ):
                found.append(proc)
    return found


class ManagerProcess:
    """A real ``toolserver manager`` subprocess with its own config, data dir and SQLite file."""

    def __init__(self, root: Path, **config: Any) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = config.pop("port", None) or free_port()
        self.data_dir = root / "data"
        self.db_path = self.data_dir / "toolserver.db"
        node = {"health_check_interval": 0.2, "stop_grace_seconds": 2, **config.pop("node", {})}
        self.config: dict[str, Any] = {
            "port": self.port,
            "data_dir": str(self.data_dir),
            "database_url": f"sqlite+aiosqlite:///{self.db_path}",
            "manager_id": f"test-{self.port}",
            "node": node,
            **config,
        }
        self.config_path = root / "manager.yml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.log_path = root / "manager.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> ManagerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOOLSERVER_")}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "toolserver", "manager", "--config", str(self.config_path)],
                cwd=self.root,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + timeout
        while not http_ok(self.url + "/alive"):
            if self.proc.poll() is not None:
                raise AssertionError(f"manager exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"manager did not answer /alive within {timeout} s:\n{self.log()}")
            time.sleep(0.05)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> bool:
        """Signal the manager and wait; True when it shut down by itself in time.

        uvicorn re-raises the signal after a graceful shutdown, so -SIGTERM counts as clean.
        """
        if self.proc is None or self.proc.poll() is not None:
            return self.proc is not None and self.proc.returncode in (0, -sig)
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout) in (0, -sig)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def query(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        con = sqlite3.connect(self.db_path, timeout=10)
        con.row_factory = sqlite3.Row
        try:
            rows = list(con.execute(sql, args))
            con.commit()
            return rows
        finally:
            con.close()

    def nodes(self) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM toolserver_nodes")

    def node(self, node_id: str) -> sqlite3.Row | None:
        rows = self.query("SELECT * FROM toolserver_nodes WHERE id = ?", node_id)
        return rows[0] if rows else None

    def node_dirs(self) -> list[Path]:
        root = self.data_dir / "nodes"
        return sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []

    def node_processes(self) -> list[psutil.Process]:
        return node_processes(self.data_dir)

    def cleanup(self) -> list[psutil.Process]:
        """Stop the manager and kill anything left under its data dir; returns what was left."""
        self.stop()
        leftovers = processes_under(self.root)
        for proc in leftovers:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        return leftovers


@contextlib.asynccontextmanager
async def inprocess_manager(root: Path, runtime_factory: Any = None, **config: Any) -> Any:
    """A manager served by uvicorn inside the test's event loop, optionally with an injected runtime.

    Yields ``(url, app)``. Used where a test injects a fault through a runtime subclass.
    """
    import asyncio

    import uvicorn

    from toolserver.manager.app import create_app
    from toolserver.manager.settings import load_settings

    port = free_port()
    node = {"health_check_interval": 0.1, "stop_grace_seconds": 1, **config.pop("node", {})}
    settings = load_settings(
        None,
        port=port,
        data_dir=str(root / "data"),
        manager_id=f"test-{port}",
        database_url=f"sqlite+aiosqlite:///{root / 'data' / 'toolserver.db'}",
        node=node,
        **config,
    )
    runtime = runtime_factory(settings) if runtime_factory else None
    app = create_app(settings, runtime=runtime)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        await task


NODE_IMAGE = os.environ.get("TOOLSERVER_NODE__IMAGE", "toolserver-node:latest")


def docker_unavailable_reason(image: str = NODE_IMAGE) -> str | None:
    """Why Docker tests cannot run here (no Engine, no node image), or None."""
    try:
        if subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode != 0:
            return "Docker Engine unreachable; run: make docker-ready"
        if subprocess.run(["docker", "image", "inspect", image], capture_output=True, timeout=20).returncode:
            return f"node image {image} is missing; run: make node-image"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"docker CLI unusable: {exc}"
    return None


def docker_volumes(label: str) -> list[str]:
    """Names of the volumes carrying ``label`` (key=value)."""
    out = subprocess.run(
        ["docker", "volume", "ls", "-q", "--filter", f"label={label}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return out.split()


def docker_containers(label: str) -> list[dict[str, str]]:
    """``docker ps -a`` rows (ID, State, Names) of containers carrying ``label`` (key=value)."""
    out = subprocess.run(
        ["docker", "ps", "-a", "--filter", f"label={label}", "--format", "{{.ID}} {{.State}} {{.Names}}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return [dict(zip(("id", "state", "name"), line.split(), strict=True)) for line in out.splitlines()]
