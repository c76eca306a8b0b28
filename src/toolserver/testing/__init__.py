"""Drive a real manager from tests and benchmarks (and from an extension author's own tests).

:class:`ManagerProcess` runs ``python -m toolserver manager`` as a subprocess with its own config
file, data directory and SQLite database under one root directory, and reads the database
directly; the helpers around it pick free ports, poll for conditions and find leftover processes.

    with ManagerProcess(tmp_path / "manager") as manager:
        cookie = httpx.post(manager.url + "/get_cookie").cookies["node_id"]
        assert manager.node(cookie)["status"] == "running"
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar, Self

import httpx
import psutil
import yaml

__all__ = [
    "SANDBOX_CGROUPS",
    "ManagerProcess",
    "cgroup_processes",
    "free_port",
    "http_ok",
    "node_of",
    "node_processes",
    "node_servers",
    "processes_under",
    "scratch_config",
    "unique_manager_id",
    "wait_until",
]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def unique_manager_id(port: int) -> str:
    """A manager id no other manager on this machine uses: Docker labels are machine-wide, and a
    later manager on a reused port must not take an earlier one's nodes for its own orphans."""
    return f"test-{port}-{secrets.token_hex(3)}"


def scratch_config(root: Path) -> dict[str, str]:
    """Manager settings that keep its data directory and SQLite database under ``root/data``."""
    data = Path(root) / "data"
    return {"data_dir": str(data), "database_url": f"sqlite+aiosqlite:///{data / 'toolserver.db'}"}


def wait_until(
    predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns something truthy and return that; AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """True when ``GET url`` answers 200 (proxy settings from the environment are ignored)."""
    try:
        return httpx.get(url, timeout=timeout, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def processes_under(path: Path) -> list[psutil.Process]:
    """Live (non-zombie) processes other than this one whose command line mentions ``path``
    or whose working directory lies under it."""
    needles = {str(path), str(Path(path).resolve())}
    found = []
    for proc in psutil.process_iter(["cmdline", "cwd", "status"]):
        with contextlib.suppress(psutil.Error):
            if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
                continue
            cwd = proc.info["cwd"] or ""
            in_dir = any(cwd == n or cwd.startswith(n + os.sep) for n in needles)
            if in_dir or any(n in part for n in needles for part in proc.info["cmdline"] or []):
                found.append(proc)
    return found


def node_processes(data_dir: Path) -> list[psutil.Process]:
    """The node servers of the nodes under ``data_dir`` (see :func:`node_servers`)."""
    return node_servers(data_dir)


#: the sandbox tier's node cgroups (pids controller): one group per node id
SANDBOX_CGROUPS = Path("/sys/fs/cgroup/pids/toolserver")


def cgroup_processes(node_ids: Iterable[str], root: Path = SANDBOX_CGROUPS) -> list[psutil.Process]:
    """Processes the kernel lists in the sandbox cgroups of ``node_ids``: how sandboxed nodes are
    found from outside (their root, working directory and command line show nothing of the data
    directory)."""
    found = []
    for node_id in node_ids:
        with contextlib.suppress(OSError, ValueError):
            for pid in map(int, (root / node_id / "cgroup.procs").read_text().split()):
                with contextlib.suppress(psutil.Error):
                    found.append(psutil.Process(pid))
    return found


def node_of(proc: psutil.Process) -> str | None:
    """The node id a process belongs to: its sandbox cgroup (``…/toolserver/<node_id>``, which the
    node cannot change), else the mark in its environment (process tier). A sandboxed server
    forked from the template has the template's environment in ``/proc``, not the node's."""
    with contextlib.suppress(OSError, psutil.Error):
        for line in Path(f"/proc/{proc.pid}/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "pids" in controllers.split(",") and path.startswith("/" + SANDBOX_CGROUPS.name + "/"):
                return path.rsplit("/", 1)[-1]
    return proc.environ().get("TOOLSERVER_MARK_NODE")


def node_servers(data_dir: Path) -> list[psutil.Process]:
    """The node servers (``python -m toolserver node``) of the nodes under ``data_dir``, on the
    process tier or sandboxed (not the sandbox's wrappers around them)."""
    nodes = data_dir / "nodes"
    ids = [d.name for d in nodes.iterdir() if d.is_dir()] if nodes.is_dir() else []
    candidates = {p.pid: p for p in [*processes_under(data_dir), *cgroup_processes(ids)]}
    found = []
    for proc in candidates.values():
        with contextlib.suppress(psutil.Error):
            if proc.cmdline()[1:4] == ["-m", "toolserver", "node"]:
                found.append(proc)
    return found


class ManagerProcess:
    """A real ``toolserver manager`` subprocess with its own config, data dir and SQLite file.

    ``config`` holds manager settings as in ``manager.yml``; ``node`` settings are merged over
    :attr:`node_defaults`. The file is written to ``root/manager.yml`` here; edit :attr:`config` and
    rewrite :attr:`config_path` before :meth:`start` to change it afterwards.
    """

    node_defaults: ClassVar[dict[str, Any]] = {"stop_grace_seconds": 2}

    def __init__(self, root: Path, *, log_level: str = "info", **config: Any) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.port: int = config.pop("port", None) or free_port()
        self.data_dir = root / "data"
        self.db_path = self.data_dir / "toolserver.db"
        self.log_level = log_level
        self.config: dict[str, Any] = {
            "port": self.port,
            **scratch_config(root),
            "manager_id": unique_manager_id(self.port),
            **config,
            "node": {**self.node_defaults, **config.get("node", {})},
        }
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def manager_id(self) -> str:
        return str(self.config["manager_id"])

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("manager not started")
        return self.proc.pid

    @property
    def config_path(self) -> Path:
        return self.root / "manager.yml"

    @property
    def log_path(self) -> Path:
        return self.root / "manager.log"

    def share_with(self, other: ManagerProcess) -> Self:
        """Make this manager, not yet started, another worker of ``other``: the same database, data
        directory and manager id (several processes serving one manager)."""
        if self.proc is not None:
            raise RuntimeError("share_with() must come before start()")
        self.data_dir, self.db_path = other.data_dir, other.db_path
        for key in ("database_url", "data_dir", "manager_id"):
            self.config[key] = other.config[key]
        self.config_path.write_text(yaml.safe_dump(self.config))
        return self

    def _popen(self, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Start the manager process; subclasses override this to track or wrap it."""
        with self.log_path.open("ab") as log:
            return subprocess.Popen(
                argv, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )

    def start(self, timeout: float = 60.0) -> Self:
        """Start the manager and wait for ``/alive``; AssertionError with the log tail if it fails."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOOLSERVER_")}
        argv = [sys.executable, "-m", "toolserver", "manager", "--config", str(self.config_path)]
        self.proc = self._popen([*argv, "--log-level", self.log_level], env)
        deadline = time.monotonic() + timeout
        while not http_ok(self.url + "/alive"):
            if self.proc.poll() is not None:
                raise AssertionError(f"manager exited with {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"manager did not answer /alive within {timeout:g} s:\n{self.tail()}")
            time.sleep(0.05)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> bool:
        """Signal the manager and wait; True when it shut down by itself in time (killed otherwise).

        uvicorn re-raises the signal after a graceful shutdown, so a return code of ``-sig`` is clean.
        """
        if self.proc is None or self.proc.poll() is not None:
            return self.proc is not None and self.proc.returncode in (0, -sig)
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout) in (0, -sig)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            return False

    def log(self) -> str:
        """The manager's combined stdout and stderr so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of :meth:`log`."""
        return "\n".join(self.log().splitlines()[-lines:])

    def query(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        """Run ``sql`` on the manager's SQLite database and commit; returns the rows."""
        con = sqlite3.connect(self.db_path, timeout=30)
        con.row_factory = sqlite3.Row
        try:
            rows = list(con.execute(sql, args))
            con.commit()
            return rows
        finally:
            con.close()

    def nodes(self) -> list[sqlite3.Row]:
        """Every node record."""
        return self.query("SELECT * FROM toolserver_nodes")

    def node(self, node_id: str) -> sqlite3.Row | None:
        """The record of node ``node_id`` (the session cookie), or None."""
        rows = self.query("SELECT * FROM toolserver_nodes WHERE id = ?", node_id)
        return rows[0] if rows else None

    def create_key(
        self,
        name: str,
        scope: str = "admin",
        *,
        max_sessions: int | None = None,
        starts_per_minute: int | None = None,
    ) -> str:
        """Add an API key to the manager's SQLite database (as ``toolserver keys create`` does) and
        return it; the manager must have started once (its tables exist)."""
        from toolserver.manager.auth import hash_key, new_key
        from toolserver.manager.models import utcnow

        key_id, token = new_key()
        self.query(
            "INSERT INTO api_keys (id, name, scope, secret_hash, created_at, max_sessions, starts_per_minute)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            key_id,
            name,
            scope,
            hash_key(token),
            utcnow().isoformat(sep=" "),
            max_sessions,
            starts_per_minute,
        )
        return token

    def node_dirs(self) -> list[Path]:
        """The per-node directories of the process runtime."""
        root = self.data_dir / "nodes"
        return sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []

    def node_processes(self) -> list[psutil.Process]:
        """Node processes running under the data dir."""
        return node_processes(self.data_dir)

    def cleanup(self) -> list[psutil.Process]:
        """Stop the manager, then kill anything left under :attr:`root`; returns what was left."""
        self.stop()
        leftovers = processes_under(self.root)
        for proc in leftovers:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        return leftovers

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
