"""The embedded default: every node is a local ``toolserver node`` process (``isolation: process``).

No keys of its own (:class:`ProcessConfig`); it uses the context's data directory, node
environment and node config file. Nodes are not confined: they run as the manager's user.

Each node owns a directory ``<data_dir>/nodes/<node_id>/`` holding ``workspace/`` (the only place
the node writes), ``state/`` (the node's own state), ``node.json`` (the runtime's mark: manager id,
pid, port) and ``node.log``. The directory is the node: ``list()`` scans these directories, so a
restarted manager finds the nodes it left running. Processes start in their own session; stop is
SIGTERM to the node, then SIGKILL to whatever is left of its process tree after the grace period.
Every process of a node carries ``TOOLSERVER_MARK_NODE`` (set by the runtime) in its environment,
so processes that outlived their node (a shell job or kernel of a node that crashed) are found and
killed when the runtime next sees the node gone (``list``, i.e. the checker's next tick) and on
removal.

A create writes ``node.json`` first, so an interrupted create leaves either a marked directory
(reported by ``list``) or, at worst, an empty one, which :meth:`ProcessRuntime.leftovers` reports
once it is :data:`DEBRIS_AGE` seconds old.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Literal

import psutil

from toolserver.errors import NodeNotFound, RuntimeBackendError
from toolserver.protocol import SECRET_ENV
from toolserver.runtimes.base import (
    CREATED,
    EXITED,
    HEALTHY,
    PAUSED,
    RUNNING,
    STARTING,
    UNHEALTHY,
    NodeInfo,
    NodeSpec,
    Runtime,
    RuntimeConfig,
    RuntimeContext,
)
from toolserver.runtimes.freezer import Freezer
from toolserver.runtimes.health import ProbePacer, node_healthy

log = logging.getLogger(__name__)

MARK_ENV = "TOOLSERVER_MARK_NODE"
MARK_FILE = "node.json"
#: Longest wait for a just-ended child's exit status (see ``inspect``).
EXIT_STATUS_WAIT = 1.0
#: Age after which a node directory without a mark counts as the debris of an interrupted create.
DEBRIS_AGE = 60.0
#: What a node id (the record's short id, a directory name) may look like.
_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


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


def _process(pid: int | None, create_time: float | None, node_id: str | None = None) -> psutil.Process | None:
    """The live process with this pid *and* start time (guards against pid reuse), or None; with
    ``node_id``, only if it also carries that node's mark (a pid written into a mark by someone
    else, the manager's say, is not the node's)."""
    if not pid or (create_time is None and node_id is not None):
        return None
    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 0.01:
            return None
        if node_id is not None and proc.environ().get(MARK_ENV) != node_id:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _marked_processes(node_id: str) -> list[psutil.Process]:
    return _marked_by({node_id}).get(node_id, [])


def _marked_by(node_ids: set[str], born_before: float | None = None) -> dict[str, list[psutil.Process]]:
    """Processes carrying the mark of one of ``node_ids`` (started before ``born_before``), by node."""
    found: dict[str, list[psutil.Process]] = {}
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            mark = proc.environ().get(MARK_ENV)
            if mark in node_ids and (born_before is None or proc.create_time() < born_before):
                found.setdefault(mark, []).append(proc)
    return found


def _remove_tree(path: Path) -> None:
    """``rm -rf path``, the mark first (from then on ``list`` no longer reports the node): gone
    already is fine, anything else that stops it raises OSError."""
    (path / MARK_FILE).unlink(missing_ok=True)

    def gone_is_fine(_func: object, _path: str, exc_info: Any) -> None:
        if not isinstance(exc_info[1], FileNotFoundError):
            raise exc_info[1]

    shutil.rmtree(path, onerror=gone_is_fine)


async def _exit_status(child: asyncio.subprocess.Process) -> None:
    """Wait (briefly) for a child that has ended to be reaped."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(child.wait(), EXIT_STATUS_WAIT)


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
        self._pacer = ProbePacer(context.health_probe_seconds)
        #: (node id, pid) of dead nodes whose leftover processes were killed already
        self._reaped: set[tuple[str, int]] = set()
        self.freezer = Freezer(_marked_processes)

    async def preflight(self) -> None:
        log.warning(
            "isolation 'process': nodes are NOT isolated (they run as the manager's user and can read "
            "its database, data directory and every other node); use it only for development"
        )

    # ---- files --------------------------------------------------------------------------------------

    def _dir(self, state: dict[str, Any]) -> Path:
        """The node's directory, ``<root>/<node_id>`` (see :meth:`_node_dir`)."""
        return self._node_dir(state)

    def _node_dir(self, state: dict[str, Any]) -> Path:
        """``<root>/<node_id>`` from the state's validated ``node_id`` (or, for a state of an older
        version, the name of its ``dir`` when that is a directory right under ``root``): never a
        path taken as it was written, which could name any directory outside the data directory."""
        node_id = str(state.get("node_id") or "")
        if not node_id and state.get("dir"):
            given = Path(str(state["dir"]))
            node_id = given.name if given.parent == self.root else ""
        if _NODE_ID.fullmatch(node_id):
            return self.root / node_id
        raise NodeNotFound("runtime state names no node directory of this runtime")

    @staticmethod
    def _read_mark(node_dir: Path) -> dict[str, Any] | None:
        """The mark of ``node_dir``, if it is one for this very directory (a mark naming another
        node or directory is no mark)."""
        try:
            mark = json.loads((node_dir / MARK_FILE).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(mark, dict) or mark.get("node_id") != node_dir.name:
            return None
        mark["dir"] = str(node_dir)
        return mark

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
            node_dir.mkdir(parents=True, exist_ok=False)
            self._write_mark(node_dir, mark)  # first: from now on list() reports the node
            (node_dir / "workspace").mkdir()
            (node_dir / "state").mkdir()
            secret_file = node_dir / "secret"
            secret_file.touch(mode=0o600)
            secret_file.write_text(spec.secret)
            (node_dir / "env.json").write_text(json.dumps(spec.env))

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
        if _process(mark.get("pid"), mark.get("create_time"), mark["node_id"]) is not None:
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
        await asyncio.to_thread(self.freezer.join, node_id, proc.pid)
        mark.pop("paused", None)
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
        """Kill what is left of the node and delete its directory; RuntimeBackendError when the
        directory cannot be deleted (the node is dead by then)."""
        node_dir = self._dir(state)
        mark = await asyncio.to_thread(self._read_mark, node_dir)
        node_id = (mark or {}).get("node_id") or node_dir.name
        await self._terminate(mark or {"node_id": node_id}, 0)
        try:
            await asyncio.to_thread(_remove_tree, node_dir)
        except OSError as exc:
            reason = exc.strerror or exc
            raise RuntimeBackendError(f"cannot delete node directory {node_dir}: {reason}") from exc
        self._children.pop(node_id, None)
        self._healthy_once.discard(node_id)
        self._pacer.forget(node_id)
        await asyncio.to_thread(self.freezer.discard, node_id)

    async def inspect(self, state: dict[str, Any]) -> NodeInfo:
        mark = await asyncio.to_thread(self._read_mark, self._dir(state))
        if mark is None:
            raise NodeNotFound(f"node directory {state.get('dir')} is gone")
        info = self._observe(mark)
        if info.running:
            await self._probe(info)
        elif (child := self._exit_pending(mark, info)) is not None:
            await _exit_status(child)
            info = self._observe(mark)
        return info

    def _exit_pending(self, mark: dict[str, Any], info: NodeInfo) -> asyncio.subprocess.Process | None:
        """Our child, when the node just ended as one and its exit status, which reaches the event
        loop a moment after the process is gone, is not in yet (the record would not say why)."""
        if info.status != EXITED or info.detail is not None:
            return None
        child = self._children.get(mark["node_id"])
        if child is None or child.pid != mark.get("pid") or child.returncode is not None:
            return None
        return child

    async def list(self, manager_id: str) -> list[NodeInfo]:
        def scan() -> tuple[list[dict[str, Any]], list[NodeInfo]]:
            """The marks and what each node's processes say (file reads: /proc, the cgroups)."""
            if not self.root.is_dir():
                return [], []
            marks = (self._read_mark(d) for d in self.root.iterdir() if d.is_dir())
            mine = [m for m in marks if m and m.get("manager_id") == manager_id]
            return mine, [self._observe(m) for m in mine]

        marks, infos = await asyncio.to_thread(scan)
        pending = {
            k: c for k, (m, i) in enumerate(zip(marks, infos, strict=True)) if (c := self._exit_pending(m, i))
        }
        if pending:
            await asyncio.gather(*(_exit_status(c) for c in pending.values()))
            for k in pending:
                infos[k] = self._observe(marks[k])
        await self._probe_paced([i for i in infos if i.running])
        await self._reap([m for m, i in zip(marks, infos, strict=True) if i.status == EXITED])
        return infos

    async def leftovers(self, manager_id: str) -> list[NodeInfo]:
        """Node directories without a mark, older than DEBRIS_AGE: what a create cut short between
        making the directory and writing its mark left behind (whoever's it was)."""

        def scan() -> list[Path]:
            if not self.root.is_dir():
                return []
            limit = time.time() - DEBRIS_AGE
            found = []
            for d in self.root.iterdir():
                with contextlib.suppress(OSError):
                    if d.is_dir() and not (d / MARK_FILE).exists() and d.stat().st_mtime < limit:
                        found.append(d)
            return found

        return [
            NodeInfo(node_id=d.name, manager_id=manager_id, status="dead", state={"dir": str(d)})
            for d in await asyncio.to_thread(scan)
        ]

    async def _reap(self, dead: list[dict[str, Any]]) -> None:
        """Kill the processes that outlived their node (a shell job, a kernel), once per death.

        Only processes started before the death was seen: a node being started again carries the
        same mark.
        """
        new = {(m["node_id"], m["pid"]) for m in dead if m.get("pid")} - self._reaped
        present = {(m["node_id"], m.get("pid")) for m in dead}
        self._reaped &= present
        if not new:
            return
        seen_at = time.time()
        found = await asyncio.to_thread(_marked_by, {node_id for node_id, _ in new}, seen_at)
        for node_id, procs in found.items():
            log.info("node %s is gone: killing the %d processes it left running", node_id, len(procs))
            _kill_all(procs, signal.SIGKILL)
        self._reaped |= new

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
        state = {"node_id": mark["node_id"], "dir": mark["dir"], "pid": mark.get("pid")}
        state["port"] = mark.get("port", 0)
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
        if _process(mark["pid"], mark.get("create_time"), mark["node_id"]) is not None:
            paused = bool(mark.get("paused"))
            return self._info(mark, PAUSED, HEALTHY) if paused else self._info(mark, RUNNING, STARTING)
        child = self._children.get(mark["node_id"])
        detail = None
        if child is not None and child.pid == mark["pid"] and child.returncode is not None:
            detail = self._exit_detail(child.returncode)
        return self._info(mark, EXITED, UNHEALTHY, detail)

    @staticmethod
    def _exit_detail(code: int) -> str:
        """What a record says of a node process that ended with ``code`` (negative: a signal)."""
        return f"killed by signal {-code}" if code < 0 else f"exit code {code}"

    async def _probe_paced(self, running: list[NodeInfo]) -> None:
        """Health of running nodes for list(), asked as often as ``health_probe_seconds`` says."""
        due = self._pacer.due(running, self._healthy_once)
        await asyncio.gather(*(self._probe(i) for i in due))
        self._pacer.asked(due)

    async def _probe(self, info: NodeInfo) -> None:
        if await node_healthy(info.host, info.port):
            self._healthy_once.add(info.node_id)
            info.health = HEALTHY
        else:
            info.health = UNHEALTHY if info.node_id in self._healthy_once else STARTING

    async def _terminate(self, mark: dict[str, Any], grace: float) -> None:
        """SIGTERM the node, SIGKILL its tree after ``grace``; then anything else carrying its mark."""
        await self._thaw(mark)  # a frozen process handles no signal
        proc = _process(mark.get("pid"), mark.get("create_time"), mark["node_id"])
        if proc is not None:
            await self._terminate_tree(proc, mark, grace)
        # background shells and kernels outlive a SIGKILLed node: they still carry its mark
        leftovers = await asyncio.to_thread(_marked_processes, mark["node_id"])
        _kill_all(leftovers, signal.SIGKILL)
        if mark.get("pid"):
            self._reaped.add((mark["node_id"], mark["pid"]))

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

    # ---- pause and fork (runtimes/freezer.py) ------------------------------------------------------

    capabilities = frozenset({"pause", "fork"})

    async def pause(self, state: dict[str, Any]) -> NodeInfo:
        """Freeze the node's processes (cgroup freezer, else SIGSTOP); the mark says it is paused."""
        node_dir = self._dir(state)
        mark = await asyncio.to_thread(self._read_mark, node_dir)
        if mark is None:
            raise NodeNotFound(f"node directory {node_dir} is gone")
        if _process(mark.get("pid"), mark.get("create_time"), mark["node_id"]) is None:
            raise RuntimeBackendError(f"node {mark['node_id']} is not running: nothing to pause")
        mark["paused"] = True  # first: from now on nobody probes it as a running node
        await asyncio.to_thread(self._write_mark, node_dir, mark)
        try:
            await asyncio.to_thread(self.freezer.freeze, mark["node_id"])
        except BaseException:
            mark.pop("paused")
            await asyncio.to_thread(self._write_mark, node_dir, mark)
            raise
        return self._observe(mark)

    async def resume(self, state: dict[str, Any]) -> NodeInfo:
        node_dir = self._dir(state)
        mark = await asyncio.to_thread(self._read_mark, node_dir)
        if mark is None:
            raise NodeNotFound(f"node directory {node_dir} is gone")
        await self._thaw(mark)
        await asyncio.to_thread(self._write_mark, node_dir, mark)
        return await self.inspect(state)

    async def _thaw(self, mark: dict[str, Any]) -> None:
        frozen = self.freezer.cgroup and await asyncio.to_thread(self.freezer.frozen, mark["node_id"])
        if mark.pop("paused", None) or frozen:
            await asyncio.to_thread(self.freezer.thaw, mark["node_id"])

    async def fork(self, state: dict[str, Any], spec: NodeSpec) -> NodeInfo:
        """Create node ``spec`` with a copy (``cp -a``) of the workspace of the node of ``state``."""
        source = self._dir(state) / "workspace"
        if not await asyncio.to_thread(source.is_dir):
            raise NodeNotFound(f"workspace {source} is gone")
        info = await self.create(spec)
        target = Path(info.state["dir"]) / "workspace"
        pipe = asyncio.subprocess
        argv = ["cp", "-a", "--", f"{source}/.", str(target)]
        proc = await pipe.create_subprocess_exec(
            *argv, stdin=pipe.DEVNULL, stdout=pipe.DEVNULL, stderr=pipe.PIPE
        )
        _, err = await proc.communicate()
        if proc.returncode != 0:
            await self.remove(info.state)
            reason = err.decode(errors="replace").strip()[-500:]
            raise RuntimeBackendError(f"cannot copy the workspace of the forked node: {reason}")
        return info
