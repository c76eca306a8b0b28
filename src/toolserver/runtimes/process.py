"""The embedded default: every node is a local ``toolserver node`` process (``isolation: process``).

No keys of its own (:class:`ProcessConfig`); it uses the context's data directory, node
environment and node config file. Nodes are not confined: they run as the manager's user.

Each node owns a directory ``<data_dir>/nodes/<node_id>/`` holding ``workspace/`` (the only place
the node writes), ``state/`` (the node's own state), ``node.json`` (the runtime's mark: manager id,
pid, port) and ``node.log``. The directory is the node: ``list()`` scans these directories, so a
restarted manager finds the nodes it left running. Processes start in their own session; stop is
SIGTERM to the node, then SIGKILL to whatever is left of its process tree after the grace period.
Every process of a node carries ``TOOLSERVER_MARK_NODE`` in its environment, so processes that
outlived their node (a kernel whose node was SIGKILLed) are still found and killed on removal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Literal

import httpx
import psutil

from toolserver.errors import NodeNotFound, RuntimeBackendError
from toolserver.protocol import SECRET_ENV
from toolserver.runtimes.base import (
    CREATED,
    EXITED,
    HEALTHY,
    RUNNING,
    STARTING,
    UNHEALTHY,
    NodeInfo,
    NodeSpec,
    Runtime,
    RuntimeConfig,
    RuntimeContext,
)

log = logging.getLogger(__name__)

MARK_ENV = "TOOLSERVER_MARK_NODE"
MARK_FILE = "node.json"
HEALTH_TIMEOUT = 1.0
#: Longest wait for a just-ended child's exit status (see ``inspect``).
EXIT_STATUS_WAIT = 1.0


def bound_socket(host: str = "127.0.0.1") -> socket.socket:
    """A TCP socket bound to a free port of ``host``, for a node to inherit and serve on.

    The port is the node's from this moment: nothing else can take it between picking and serving.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
    except OSError:
        sock.close()
        raise
    return sock


def _process(pid: int | None, create_time: float | None) -> psutil.Process | None:
    """The live process with this pid *and* start time (guards against pid reuse), or None."""
    if not pid:
        return None
    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 0.01:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _marked_processes(node_id: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(MARK_ENV) == node_id:
                found.append(proc)
    return found


def _kill_all(procs: list[psutil.Process], sig: int) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)


class ProcessConfig(RuntimeConfig):
    """The process runtime's config: no keys of its own."""

    type: Literal["process"] = "process"


class ProcessRuntime(Runtime):
    name = "process"
    config_model = ProcessConfig

    def __init__(self, config: ProcessConfig, context: RuntimeContext) -> None:
        super().__init__(config, context)
        self.root = Path(context.data_dir).resolve() / "nodes"
        self.node_config = Path(context.node_config).resolve() if context.node_config else None
        self.extra_env = dict(context.node_env)
        self.host = "127.0.0.1"
        self._children: dict[str, asyncio.subprocess.Process] = {}
        self._healthy_once: set[str] = set()
        self._http = httpx.AsyncClient(timeout=HEALTH_TIMEOUT, trust_env=False)

    # ---- files --------------------------------------------------------------------------------------

    def _dir(self, state: dict[str, Any]) -> Path:
        try:
            return Path(state["dir"])
        except KeyError:
            raise NodeNotFound("runtime state has no node directory") from None

    @staticmethod
    def _read_mark(node_dir: Path) -> dict[str, Any] | None:
        try:
            return json.loads((node_dir / MARK_FILE).read_text())
        except (OSError, ValueError):
            return None

    @staticmethod
    def _write_mark(node_dir: Path, mark: dict[str, Any]) -> None:
        tmp = node_dir / (MARK_FILE + ".tmp")
        tmp.write_text(json.dumps(mark))
        tmp.replace(node_dir / MARK_FILE)

    # ---- contract -----------------------------------------------------------------------------------

    async def create(self, spec: NodeSpec) -> NodeInfo:
        node_dir = self.root / spec.node_id
        mark = {
            "node_id": spec.node_id,
            "manager_id": spec.manager_id,
            "dir": str(node_dir),
            "pid": None,
            "create_time": None,
            "port": 0,
        }

        def prepare() -> None:
            (node_dir / "workspace").mkdir(parents=True, exist_ok=False)
            (node_dir / "state").mkdir()
            secret_file = node_dir / "secret"
            secret_file.touch(mode=0o600)
            secret_file.write_text(spec.secret)
            (node_dir / "env.json").write_text(json.dumps(spec.env))
            self._write_mark(node_dir, mark)

        try:
            await asyncio.to_thread(prepare)
        except OSError as exc:
            raise RuntimeBackendError(f"cannot create node directory {node_dir}: {exc}") from exc
        return self._info(mark, CREATED)

    async def start(self, state: dict[str, Any]) -> NodeInfo:
        node_dir = self._dir(state)
        mark = await asyncio.to_thread(self._read_mark, node_dir)
        if mark is None:
            raise NodeNotFound(f"node directory {node_dir} is gone")
        if _process(mark.get("pid"), mark.get("create_time")) is not None:
            return await self.inspect(state)
        node_id = mark["node_id"]

        def read_secret_env() -> tuple[str, dict[str, str]]:
            return (node_dir / "secret").read_text(), json.loads((node_dir / "env.json").read_text())

        secret, spec_env = await asyncio.to_thread(read_secret_env)
        env = {
            **os.environ,
            **self.extra_env,
            **spec_env,
            SECRET_ENV: secret,
            MARK_ENV: node_id,
            "TOOLSERVER_NODE_STATE_DIR": str(node_dir / "state"),
            "PYTHONUNBUFFERED": "1",
        }
        logfile = await asyncio.to_thread(open, node_dir / "node.log", "ab")
        try:
            sock = bound_socket(self.host)
        except OSError as exc:
            logfile.close()
            raise RuntimeBackendError(f"cannot bind a port on {self.host}: {exc}") from exc
        port = int(sock.getsockname()[1])
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.command(sock.fileno(), node_dir),
                env=env,
                cwd=str(node_dir),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logfile,
                stderr=logfile,
                start_new_session=True,
                pass_fds=(sock.fileno(),),
            )
        except OSError as exc:
            raise RuntimeBackendError(f"cannot start node process: {exc}") from exc
        finally:
            logfile.close()
            sock.close()  # the node holds its own copy
        self._children[node_id] = proc
        self._healthy_once.discard(node_id)
        try:
            create_time = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            create_time = None
        mark.update(pid=proc.pid, create_time=create_time, port=port)
        await asyncio.to_thread(self._write_mark, node_dir, mark)
        state.update(pid=proc.pid, port=port)
        return self._info(mark, RUNNING, STARTING)

    async def stop(self, state: dict[str, Any], grace: float = 5.0) -> None:
        mark = await asyncio.to_thread(self._read_mark, self._dir(state))
        if mark is None:
            raise NodeNotFound(f"node directory {state.get('dir')} is gone")
        await self._terminate(mark, grace)

    async def kill(self, state: dict[str, Any]) -> None:
        await self.stop(state, grace=0)

    async def remove(self, state: dict[str, Any]) -> None:
        node_dir = self._dir(state)
        mark = await asyncio.to_thread(self._read_mark, node_dir)
        node_id = (mark or {}).get("node_id") or node_dir.name
        await self._terminate(mark or {"node_id": node_id}, 0)
        await asyncio.to_thread(shutil.rmtree, node_dir, True)
        self._children.pop(node_id, None)
        self._healthy_once.discard(node_id)

    async def inspect(self, state: dict[str, Any]) -> NodeInfo:
        mark = await asyncio.to_thread(self._read_mark, self._dir(state))
        if mark is None:
            raise NodeNotFound(f"node directory {state.get('dir')} is gone")
        info = self._observe(mark)
        if info.running:
            await self._probe(info)
        elif info.status == EXITED and info.detail is None:
            # our child just ended: its exit status reaches the event loop a moment after the
            # process is gone; wait that moment so the record can say why it stopped
            child = self._children.get(mark["node_id"])
            if child is not None and child.pid == mark.get("pid") and child.returncode is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(child.wait(), EXIT_STATUS_WAIT)
                info = self._observe(mark)
        return info

    async def list(self, manager_id: str) -> list[NodeInfo]:
        def scan() -> list[dict[str, Any]]:
            if not self.root.is_dir():
                return []
            marks = (self._read_mark(d) for d in self.root.iterdir() if d.is_dir())
            return [m for m in marks if m and m.get("manager_id") == manager_id]

        infos = [self._observe(m) for m in await asyncio.to_thread(scan)]
        await asyncio.gather(*(self._probe(i) for i in infos if i.running))
        return infos

    async def aclose(self) -> None:
        await self._http.aclose()

    # ---- helpers ------------------------------------------------------------------------------------

    def command(self, fd: int, node_dir: Path) -> list[str]:
        """The node's command line: it serves on the inherited socket ``fd``."""
        argv = [sys.executable, "-m", "toolserver", "node", "--fd", str(fd)]
        argv += ["--workspace", str(node_dir / "workspace")]
        if self.node_config:
            argv += ["--config", str(self.node_config)]
        return argv

    def _info(
        self, mark: dict[str, Any], status: str, health: str = "Unknown", detail: str | None = None
    ) -> NodeInfo:
        state = {"dir": mark["dir"], "pid": mark.get("pid"), "port": mark.get("port", 0)}
        return NodeInfo(
            node_id=mark["node_id"],
            manager_id=mark["manager_id"],
            status=status,
            health=health,
            host=self.host,
            port=int(mark.get("port") or 0),
            state=state,
            detail=detail,
        )

    def _observe(self, mark: dict[str, Any]) -> NodeInfo:
        if mark.get("pid") is None:
            return self._info(mark, CREATED)
        if _process(mark["pid"], mark.get("create_time")) is not None:
            return self._info(mark, RUNNING, STARTING)
        child = self._children.get(mark["node_id"])
        detail = None
        if child is not None and child.pid == mark["pid"] and child.returncode is not None:
            code = child.returncode
            detail = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        return self._info(mark, EXITED, UNHEALTHY, detail)

    async def _probe(self, info: NodeInfo) -> None:
        try:
            resp = await self._http.get(f"http://{info.host}:{info.port}/health")
            ok = resp.status_code == 200
        except httpx.HTTPError:
            ok = False
        if ok:
            self._healthy_once.add(info.node_id)
            info.health = HEALTHY
        else:
            info.health = UNHEALTHY if info.node_id in self._healthy_once else STARTING

    async def _terminate(self, mark: dict[str, Any], grace: float) -> None:
        """SIGTERM the node, SIGKILL its tree after ``grace``; then anything else carrying its mark."""
        proc = _process(mark.get("pid"), mark.get("create_time"))
        if proc is not None:
            await self._terminate_tree(proc, mark, grace)
        # background shells and kernels outlive a SIGKILLed node: they still carry its mark
        leftovers = await asyncio.to_thread(_marked_processes, mark["node_id"])
        _kill_all(leftovers, signal.SIGKILL)

    async def _terminate_tree(self, proc: psutil.Process, mark: dict[str, Any], grace: float) -> None:
        try:
            tree = [proc, *await asyncio.to_thread(proc.children, True)]
        except psutil.Error:
            tree = [proc]
        if grace > 0:
            _kill_all([proc], signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and _process(proc.pid, mark.get("create_time")) is not None:
                await asyncio.sleep(0.05)
        _kill_all([p for p in tree if p.is_running()], signal.SIGKILL)
        child = self._children.get(mark["node_id"])
        if child is not None and child.pid == proc.pid:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(child.wait(), 5)
        else:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and _process(proc.pid, mark.get("create_time")) is not None:
                await asyncio.sleep(0.02)
