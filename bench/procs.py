"""Processes the benchmarks start (managers, nodes, nginx, load generators) and their cleanup.

Every process is registered here; :func:`cleanup_all` (run in ``finally``, at exit and on
SIGTERM/SIGINT) ends them, then anything still running whose command line or working directory
lies under a registered scratch root (nodes a manager started), then Docker containers and
volumes carrying a registered manager id.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from toolserver.runtimes.base import LABEL_MANAGER
from toolserver.testing import ManagerProcess, free_port, processes_under

_procs: list[subprocess.Popen[bytes]] = []
_roots: list[Path] = []
_docker_managers: list[str] = []


def spawn(
    argv: list[str],
    log: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    pass_fds: tuple[int, ...] = (),
) -> Any:
    """Start a registered subprocess writing to ``log`` (inheriting the descriptors ``pass_fds``)."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            pass_fds=pass_fds,
        )
    _procs.append(proc)
    return proc


def end(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
    """Signal ``proc``, wait, kill it if it lingers; returns its exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    with contextlib.suppress(ValueError):
        _procs.remove(proc)
    return proc.returncode


def register_root(root: Path) -> None:
    _roots.append(root.resolve())


def _docker_cleanup(manager_id: str) -> None:
    if shutil.which("docker") is None:
        return
    label = f"label={LABEL_MANAGER}={manager_id}"
    for kind, listing in (("container", ["ps", "-aq"]), ("volume", ["volume", "ls", "-q"])):
        try:
            ids = subprocess.run(
                ["docker", *listing, "--filter", label], capture_output=True, text=True, timeout=30
            ).stdout.split()
            if ids:
                rm = ["rm", "-f"] if kind == "container" else ["volume", "rm", "-f"]
                subprocess.run(["docker", *rm, *ids], capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            pass


def cleanup_all() -> list[int]:
    """End everything the benchmarks started; returns the pids that had to be killed afterwards."""
    for proc in list(_procs):
        end(proc, timeout=15)
    killed = []
    for root in _roots:
        for proc in processes_under(root):
            with contextlib.suppress(psutil.Error):
                proc.kill()
                killed.append(proc.pid)
    for manager_id in _docker_managers:
        _docker_cleanup(manager_id)
    _roots.clear()
    _docker_managers.clear()
    return killed


def install_signal_handlers() -> None:
    """SIGTERM ends the run like Ctrl-C does, so ``finally`` blocks clean up."""

    def stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)


class Manager(ManagerProcess):
    """The harness's manager, registered for :func:`cleanup_all`; ``stop`` also ends its nodes
    and, with the Docker runtime, its containers and volumes."""

    def __init__(self, root: Path, *, log_level: str = "warning", **config: Any) -> None:
        register_root(root)
        port = config.pop("port", None) or free_port()
        config.setdefault("manager_id", f"bench-{os.getpid()}-{port}")
        super().__init__(root, log_level=log_level, port=port, **config)
        if self.docker:
            _docker_managers.append(self.manager_id)

    @property
    def docker(self) -> bool:
        """Whether this manager's nodes are Docker containers (``isolation``, or its former name)."""
        return (self.config.get("isolation") or self.config.get("runtime")) == "docker"

    def _popen(self, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        return spawn(argv, self.log_path, env=env, cwd=self.root)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> bool:
        clean = super().stop(sig, timeout)
        if self.proc is not None:
            end(self.proc)  # already ended: only unregisters it
        for proc in processes_under(self.root):
            with contextlib.suppress(psutil.Error):
                proc.kill()
        if self.docker:
            _docker_cleanup(self.manager_id)
        return clean

    def node(self, node_id: str) -> sqlite3.Row:
        """The record of session ``node_id``; LookupError when there is none."""
        record = super().node(node_id)
        if record is None:
            raise LookupError(f"no record for session {node_id[:8]}…")
        return record

    def pooled_ready(self) -> set[str]:
        rows = self.query(
            "SELECT id FROM toolserver_nodes WHERE pooled AND status = 'running' AND health = 'healthy'"
        )
        return {r["id"] for r in rows}


class Node:
    """A ``toolserver node`` started directly (no manager), with its own secret."""

    def __init__(self, root: Path, secret: str = "bench-secret") -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        register_root(root)
        self.port = free_port()
        self.secret = secret
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def launch(self) -> float:
        """Start the process; returns the perf_counter time just before the fork."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOOLSERVER_")}
        env["TOOLSERVER_NODE_SECRET"] = self.secret
        argv = [sys.executable, "-m", "toolserver", "node", "--host", "127.0.0.1", "--port", str(self.port)]
        argv += ["--workspace", str(self.root / "workspace")]
        started = time.perf_counter()
        self.proc = spawn(argv, self.root / "node.log", env=env, cwd=self.root)
        return started

    def wait_healthy(self, timeout: float = 60.0, interval: float = 0.01) -> float:
        """Poll ``GET /health``; returns the perf_counter time of the first 200."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=1.0, trust_env=False) as http:  # one client, like the runtime's probe
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if http.get(self.url + "/health").status_code == 200:
                        return time.perf_counter()
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"node exited with {self.proc.returncode}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"node not healthy within {timeout:g} s")
                time.sleep(interval)

    def stop(self) -> None:
        if self.proc is not None:
            end(self.proc, timeout=10)
