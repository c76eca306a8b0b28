"""The ``sandbox`` tier, the embedded default: every node a local process confined by bubblewrap.

Each node runs in its own user, mount, PID, IPC, UTS and network namespaces (see
:mod:`toolserver.runtimes.sandbox_jail` for what it sees), as a host uid of its own from
``uid_base`` on (never root), in a cgroup of its own with the memory, CPU and pids limits of
``node.resources`` (see :mod:`toolserver.runtimes.sandbox_limits`), on a workspace of
``workspace_size`` bytes. It has no network but loopback (``network: none``), or outbound
connections through pasta with the host's loopback unreachable (``network: egress``).

A node serves HTTP on a Unix socket, ``<node_dir>/node.sock``, which the runtime binds and hands
to it; its address is ``host = "unix:<path>"``, ``port = 0``, and the manager dials it so.

The directory layout is the process runtime's, ``<data_dir>/nodes/<node_id>/``, but the directory
is root's (0700) and the node sees only ``workspace/`` (and its ``state/``), bound into its
sandbox: the runtime's marks (``node.json``, the socket, the secret) are out of its reach. The
directory is always derived from the node id, a pid is trusted only with its start time and only
while it is in the node's cgroup, and the processes to kill are those the kernel lists in the
cgroup, never anything the node wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from toolserver.errors import ConfigError, NodeNotFound, RuntimeBackendError
from toolserver.protocol import SECRET_ENV
from toolserver.runtimes.base import (
    CREATED,
    EXITED,
    HEALTHY,
    PAUSED,
    RUNNING,
    STARTING,
    UNIX_PREFIX,
    NodeInfo,
    NodeSpec,
    RuntimeContext,
)
from toolserver.runtimes.process import MARK_ENV, ProcessRuntime, _process, _remove_tree
from toolserver.runtimes.sandbox_config import SandboxConfig
from toolserver.runtimes.sandbox_jail import (
    INNER_UID,
    NODE_CONFIG,
    WORKSPACE,
    UidClaims,
    inner_args,
    node_env,
    outer_args,
    write_etc,
)
from toolserver.runtimes.sandbox_limits import CONTROLLERS, NodeCgroup, make_disk, mount_disk, unmount_disk
from toolserver.runtimes.sandbox_template import READY_SECONDS, WAITER, Template, start_time

log = logging.getLogger(__name__)

SOCKET_NAME = "node.sock"
#: longest socket path the kernel takes (108 bytes with the terminating NUL)
_SUN_PATH_MAX = 107
#: machine-wide directory of the host uids nodes hold (see UidClaims)
UID_CLAIMS = Path("/run/toolserver/sandbox-uids")
#: where sockets go whose path under a long data_dir would be too long
SHORT_SOCKET_DIR = Path("/run/toolserver/sockets")
#: what nodes go without when a cgroup controller is missing
_WITHOUT_CONTROLLER = {
    "memory": "a memory limit (and OOMKilled in the record)",
    "pids": "a process limit per node (the rlimit counts per uid)",
    "cpu": "a CPU quota",
    "freezer": "pause (pause_session and idle_action: pause fail)",
}
#: the sandbox's own processes around a node
_WRAPPERS = frozenset({"bwrap", "pasta", "pasta.avx2", "sh", "prlimit", "setpriv"})
#: the node setting ``offline``: what its web tools answer with ``network: none``
OFFLINE_ENV = "TOOLSERVER_NODE_OFFLINE"
OFFLINE_REASON = "runtime_config.network is 'none' (loopback only); set it to 'egress' for the web"
#: ``sh -c`` script: write its own pid into the N cgroup.procs files given first, then exec the rest
_JOIN_CGROUPS = (
    'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; n=$((n-1)); done; exec "$@"'
)


def _wait_ready(fd: int, timeout: float) -> bool:
    """Whether the waiter wrote its line on ``fd`` within ``timeout`` (False: the sandbox ended)."""
    poller = select.poll()  # not select(): a manager of many nodes holds descriptors past 1024
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000)) and os.read(fd, 64).startswith(b"ready")


def _descendants(pid: int) -> list[int]:
    """Host pids below ``pid``, from the kernel's children lists (``/proc/P/task/T/children``):
    the cost is the tree's, not the host's (psutil's ``children`` reads every process on it)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{parent}/task"):
                with contextlib.suppress(OSError):
                    with open(f"/proc/{parent}/task/{task}/children") as fh:
                        kids = [int(k) for k in fh.read().split()]
                    found += kids
                    todo += kids
    return found


def _waiter_of(pid: int, uid: int) -> int:
    """The waiter's host pid: the one ``sh`` of the node's uid below the sandbox's first process
    (nothing of the node's runs there yet, so the tree is the sandbox's own)."""
    try:
        below = [psutil.Process(p) for p in _descendants(pid)]
        found = [p.pid for p in below if p.name() == "sh" and p.uids().real == uid]
    except psutil.Error as exc:
        raise RuntimeBackendError(f"the sandbox ended as it started: {exc}") from exc
    if len(found) != 1:
        raise RuntimeBackendError(f"the sandbox has {len(found)} waiters, not 1")
    return found[0]


def _ended(pidfd: int) -> bool:
    """Whether the process of ``pidfd`` has ended (a pidfd turns readable then)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def socket_path(node_dir: Path) -> Path:
    """The node's socket: in its directory, or (for a data_dir too deep for a socket path) a
    root-only directory of short names derived from it."""
    path = node_dir / SOCKET_NAME
    if len(str(path)) <= _SUN_PATH_MAX:
        return path
    digest = hashlib.blake2s(str(node_dir).encode(), digest_size=12).hexdigest()
    return SHORT_SOCKET_DIR / f"{digest}.sock"


def missing_requirements(config: SandboxConfig) -> str | None:
    """What this machine lacks to run ``config``'s sandboxes (None: nothing). Blocks (it runs bwrap)."""
    if os.geteuid() != 0:
        uid = os.geteuid()
        return f"the manager must run as root to give each node a uid of its own (it runs as uid {uid})"
    tools = ["bwrap", "setpriv", "prlimit"] + (["pasta"] if config.network == "egress" else [])
    if config.workspace_bytes is not None:
        tools += ["mkfs.ext4", "mount", "umount"]
    absent = [tool for tool in tools if shutil.which(tool) is None]
    if absent:
        return "missing " + ", ".join(absent) + " (Debian: bubblewrap, util-linux, passt, e2fsprogs)"
    probe = [
        "bwrap", "--unshare-pid", "--unshare-net", "--dev-bind", "/", "/",
        "setpriv", f"--reuid={config.uid_base}", f"--regid={config.uid_base}", "--clear-groups",
        "bwrap", "--unshare-user", "--disable-userns", "--dev-bind", "/", "/", "true",
    ]  # fmt: skip
    try:
        done = subprocess.run(probe, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bubblewrap cannot run: {exc}"
    if done.returncode:
        return f"bubblewrap cannot make namespaces (user namespaces disabled?): {done.stderr.strip()}"
    return None


class SandboxRuntime(ProcessRuntime):
    name = "sandbox"
    config_model = SandboxConfig
    capabilities = frozenset({"pause", "fork"})

    def __init__(self, config: SandboxConfig, context: RuntimeContext) -> None:
        super().__init__(config, context)  # type: ignore[arg-type]
        self.config: SandboxConfig = config
        self.etc = Path(context.data_dir).resolve() / "sandbox-etc"
        self.claims = UidClaims(UID_CLAIMS, config.uid_base, config.uid_count)
        self.cgroup_root = Path(config.cgroup_root)
        #: the pre-imported process nodes are forked from (None: every node imports its own stack)
        self.template = Template(node_env({})) if config.template else None
        #: node id -> ((pid, start time) of its mark, pidfd, manager id) of nodes seen running
        self._pidfds: dict[str, tuple[tuple[Any, Any], int, str]] = {}
        self._pidfd_lock = threading.RLock()
        #: pidfds held at most (a quarter of the descriptor limit; nodes beyond get the full check)
        self._pidfd_budget = resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4

    # ---- checks -------------------------------------------------------------------------------------

    async def preflight(self) -> None:
        missing = await asyncio.to_thread(missing_requirements, self.config)
        if missing:
            raise ConfigError(
                f"isolation 'sandbox' cannot run here: {missing}. Install it (scripts/ensure-sandbox.sh), "
                "or choose isolation: docker (needs a Docker Engine) or, for development only, "
                "isolation: process (nodes not isolated)"
            )
        absent = [c for c in CONTROLLERS if c not in NodeCgroup(self.cgroup_root, "-").available()]
        if absent:
            log.warning(
                "sandbox: no writable cgroup v1 controller %s under %s (cgroup v2 is not supported "
                "yet), so nodes run without: %s; the process-count rlimit still holds",
                ", ".join(absent),
                self.cgroup_root,
                "; ".join(_WITHOUT_CONTROLLER[c] for c in absent),
            )

    # ---- files --------------------------------------------------------------------------------------

    def _dir(self, state: dict[str, Any]) -> Path:
        """Always ``<root>/<node_id>``, from a validated node id (never a path read from anywhere)."""
        return self._node_dir(state)

    def _cgroup(self, node_id: str) -> NodeCgroup:
        return NodeCgroup(self.cgroup_root, node_id)

    # ---- contract -----------------------------------------------------------------------------------

    async def create(self, spec: NodeSpec) -> NodeInfo:
        node_dir = self._node_dir({"node_id": spec.node_id})
        return await self._create(spec, node_dir, copy_from=None)

    async def _create(self, spec: NodeSpec, node_dir: Path, copy_from: Path | None) -> NodeInfo:
        mark: dict[str, Any] = {
            "node_id": spec.node_id,
            "manager_id": spec.manager_id,
            "dir": str(node_dir),
            "pid": None,
            "create_time": None,
            "uid": None,
        }
        size = self.config.workspace_bytes
        made = False

        def prepare() -> None:
            nonlocal made
            self.root.mkdir(parents=True, exist_ok=True)
            write_etc(self.etc)
            node_dir.mkdir(mode=0o700, exist_ok=False)
            made = True
            uid = self.claims.claim(node_dir)
            mark["uid"] = uid
            self._write_mark(node_dir, mark)  # first: from now on list() reports the node
            top = node_dir / "disk"
            if size is not None:
                make_disk(node_dir / "workspace.img", top, size, self.etc)
            else:
                top.mkdir()
            for sub in ("workspace", "state"):
                (top / sub).mkdir(exist_ok=True)
                os.chown(top / sub, uid, uid)
            if copy_from is not None:
                copy = ["cp", "-a", "--no-dereference", f"{copy_from}/.", str(top / "workspace")]
                subprocess.run(copy, check=True, timeout=600, capture_output=True)
                chown = ["chown", "-R", "--no-dereference", f"{uid}:{uid}", str(top / "workspace")]
                subprocess.run(chown, check=True, timeout=600, capture_output=True)
            secret_file = node_dir / "secret"
            secret_file.touch(mode=0o600)
            secret_file.write_text(spec.secret)
            (node_dir / "env.json").write_text(json.dumps(spec.env))

        try:
            await asyncio.to_thread(prepare)
        except (OSError, subprocess.SubprocessError) as exc:
            if made:  # what this create made goes again (never a node that was there before)
                with contextlib.suppress(Exception):
                    await self.remove({"node_id": spec.node_id})
            raise RuntimeBackendError(f"cannot create node directory {node_dir}: {exc}") from exc
        return self._info(mark, CREATED)

    async def start(self, state: dict[str, Any]) -> NodeInfo:
        node_dir = self._dir(state)
        mark = await asyncio.to_thread(self._read_mark, node_dir)
        if mark is None:
            raise NodeNotFound(f"node directory {node_dir} is gone")
        if self._alive(mark) is not None:
            return await self.inspect(state)
        node_id = mark["node_id"]
        cgroup = self._cgroup(node_id)

        def prepare() -> tuple[str, dict[str, str], list[str], socket.socket]:
            if (node_dir / "workspace.img").exists():
                mount_disk(node_dir / "workspace.img", node_dir / "disk")
            cgroup.kill_all()  # nothing of an earlier run may stay
            procs = cgroup.create(self.context.resources)
            secret = (node_dir / "secret").read_text()
            env = json.loads((node_dir / "env.json").read_text())
            return secret, env, procs, self._bind(node_dir)

        try:
            secret, spec_env, procs, sock = await asyncio.to_thread(prepare)
        except OSError as exc:
            raise RuntimeBackendError(f"cannot prepare node {node_id}: {exc}") from exc
        env = node_env({**self.extra_env, **spec_env, SECRET_ENV: secret, MARK_ENV: node_id})
        if self.config.network == "none":
            env[OFFLINE_ENV] = OFFLINE_REASON
        logfile = await asyncio.to_thread(open, node_dir / "node.log", "ab")
        # the outer bwrap reads its options from a pipe: in a command line the node would see them
        options_r, options_w = os.pipe()
        # with the template: the waiter says it is up on ready_w (its stdout) and lives while
        # lifeline_w (its stdin) is open
        ready_r, ready_w = os.pipe() if self.template is not None else (-1, -1)
        lifeline_r, lifeline_w = os.pipe() if self.template is not None else (-1, -1)
        try:
            try:
                argv, options = self.sandbox_command(
                    sock.fileno(), node_dir, int(mark["uid"]), procs, options_r, waiter=ready_w >= 0
                )
                try:
                    os.write(options_w, b"\0".join(o.encode() for o in options) + b"\0")  # far below 64 KiB
                finally:
                    os.close(options_w)  # exactly once: a second close could hit another thread's new file
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    env=env,
                    cwd=str(node_dir),
                    stdin=lifeline_r if lifeline_r >= 0 else asyncio.subprocess.DEVNULL,
                    stdout=ready_w if ready_w >= 0 else logfile,
                    stderr=logfile,
                    start_new_session=True,
                    pass_fds=(sock.fileno(), options_r),
                )
            except OSError as exc:
                raise RuntimeBackendError(f"cannot start the sandbox: {exc}") from exc
            finally:
                for fd in (options_r, ready_w, lifeline_r):
                    if fd >= 0:
                        os.close(fd)
                ready_w = lifeline_r = -1
            self._children[node_id] = proc
            self._healthy_once.discard(node_id)
            try:
                create_time = psutil.Process(proc.pid).create_time()
            except psutil.Error:
                create_time = None
            # the mark names the pid once it is in its cgroups: a list() before would see a process
            # outside the node's groups, call the node dead and reap the run that is just starting
            if procs and not await asyncio.to_thread(cgroup.wait_joined, proc.pid):
                await self._abandon(proc, cgroup)
                raise RuntimeBackendError(f"node {node_id} did not join its cgroups (exit {proc.returncode})")
            if self.template is not None:
                try:
                    fds = (sock.fileno(), logfile.fileno(), lifeline_w)
                    await self._spawn_server(proc, mark, procs, env, fds, ready_r)
                except RuntimeBackendError:
                    await self._abandon(proc, cgroup)
                    raise
        finally:
            logfile.close()
            sock.close()  # the node holds its own copy
            for fd in (ready_r, lifeline_w):
                if fd >= 0:
                    os.close(fd)
        mark.update(pid=proc.pid, create_time=create_time, socket=str(socket_path(node_dir)))
        await asyncio.to_thread(self._write_mark, node_dir, mark)
        state.update(node_id=node_id, dir=str(node_dir), pid=proc.pid)
        return self._info(mark, RUNNING, STARTING)

    async def stop(self, state: dict[str, Any], grace: float = 5.0) -> None:
        """Stop the node; its cgroups go and its workspace is unmounted (both come back at start)."""
        await super().stop(state, grace)
        node_dir = self._dir(state)

        def release() -> None:
            self._cgroup(node_dir.name).remove()
            unmount_disk(node_dir / "disk")

        try:
            await asyncio.to_thread(release)
        except OSError as exc:
            raise RuntimeBackendError(f"cannot release the resources of node {node_dir.name}: {exc}") from exc

    async def remove(self, state: dict[str, Any]) -> None:
        """Kill the node, delete its cgroups, unmount and delete its directory, give its uid back."""
        node_dir = self._dir(state)
        mark = await asyncio.to_thread(self._read_mark, node_dir) or {"node_id": node_dir.name}
        await self._terminate(mark, 0)

        def clean() -> None:
            self._cgroup(node_dir.name).remove()
            unmount_disk(node_dir / "disk")
            with contextlib.suppress(FileNotFoundError):
                socket_path(node_dir).unlink()
            _remove_tree(node_dir)
            if mark.get("uid") is not None:
                self.claims.release(int(mark["uid"]), node_dir)

        try:
            await asyncio.to_thread(clean)
        except OSError as exc:
            raise RuntimeBackendError(f"cannot delete node directory {node_dir}: {exc}") from exc
        self._children.pop(node_dir.name, None)
        self._healthy_once.discard(node_dir.name)
        self._pacer.forget(node_dir.name)

    async def pause(self, state: dict[str, Any]) -> NodeInfo:
        info = await self.inspect(state)
        if info.status == PAUSED:
            return info
        if not info.running:
            raise RuntimeBackendError(f"node {info.node_id} is {info.status}, not running: cannot pause it")
        if not await asyncio.to_thread(self._cgroup(info.node_id).freeze, True):
            raise RuntimeBackendError("no freezer cgroup on this machine: cannot pause a node")
        return await self.inspect(state)

    async def resume(self, state: dict[str, Any]) -> NodeInfo:
        info = await self.inspect(state)
        if info.status == PAUSED:
            await asyncio.to_thread(self._cgroup(info.node_id).freeze, False)
            info = await self.inspect(state)
        return info

    async def fork(self, state: dict[str, Any], spec: NodeSpec) -> NodeInfo:
        source = self._dir(state)
        if await asyncio.to_thread(self._read_mark, source) is None:
            raise NodeNotFound(f"node directory {source} is gone")
        target = self._node_dir({"node_id": spec.node_id})
        return await self._create(spec, target, copy_from=source / "disk" / "workspace")

    # ---- helpers ------------------------------------------------------------------------------------

    def _bind(self, node_dir: Path) -> socket.socket:
        """The node's listening Unix socket, root's only (the manager connects; the node accepts)."""
        path = socket_path(node_dir)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            os.chmod(path, 0o600)
        except OSError:
            sock.close()
            raise
        return sock

    def sandbox_command(
        self,
        fd: int,
        node_dir: Path,
        uid: int,
        cgroup_procs: list[str],
        options_fd: int,
        waiter: bool = False,
    ) -> tuple[list[str], list[str]]:
        """join the cgroups → rlimits → [pasta] → outer bwrap → setpriv → inner bwrap → node: the
        command line, and the outer bwrap's options, which it reads from ``options_fd``. With
        ``waiter``, the sandbox runs the template's waiter instead of the node (which the template
        forks into it)."""
        egress = self.config.network == "egress"
        argv = ["/bin/sh", "-c", _JOIN_CGROUPS, "sh", str(len(cgroup_procs)), *cgroup_procs]
        limits = self.context.resources
        if limits.pids_limit:  # per uid: holds where there is no pids cgroup
            argv += ["prlimit", f"--nproc={limits.pids_limit}", "--"]
        if egress:
            argv += ["pasta", "--runas", "0", "--config-net", "-T", "none", "-U", "none", "--no-map-gw"]
            argv += ["--netns-only", "-q", "--"]
        top = node_dir / "disk"
        argv += ["bwrap", "--args", str(options_fd)]
        options = outer_args(
            workspace=top / "workspace",
            state=top / "state",
            etc=self.etc,
            node_config=self.node_config,
            own_netns=not egress,
        )
        argv += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all"]
        argv += ["bwrap", *inner_args()]
        if waiter:
            return [*argv, "/bin/sh", "-c", WAITER], options
        argv += [sys.executable, "-m", "toolserver", "node", "--fd", str(fd), "--workspace", WORKSPACE]
        return argv + (["--config", NODE_CONFIG] if self.node_config else []), options

    async def _spawn_server(
        self,
        proc: asyncio.subprocess.Process,
        mark: dict[str, Any],
        cgroup_procs: list[str],
        env: dict[str, str],
        fds: tuple[int, int, int],
        ready_fd: int,
    ) -> None:
        """Wait for the sandbox's waiter, then have the template fork the node's server into it."""
        assert self.template is not None
        node_id = mark["node_id"]
        if not await asyncio.to_thread(_wait_ready, ready_fd, READY_SECONDS):
            raise RuntimeBackendError(f"node {node_id}: its sandbox did not come up (exit {proc.returncode})")
        waiter = await asyncio.to_thread(_waiter_of, proc.pid, int(mark["uid"]))
        request = {
            "waiter_pid": waiter,
            "waiter_start": await asyncio.to_thread(start_time, waiter),
            "cgroup_procs": cgroup_procs,
            "nproc": self.context.resources.pids_limit or None,
            "uid": INNER_UID,
            "env": env,
            "cwd": WORKSPACE,
            "config": NODE_CONFIG if self.node_config else None,
        }
        try:
            await self.template.spawn(request, list(fds))
        except OSError as exc:
            raise RuntimeBackendError(f"node {node_id}: cannot start from the template: {exc}") from exc

    async def _abandon(self, proc: asyncio.subprocess.Process, cgroup: NodeCgroup) -> None:
        """Kill a sandbox that did not start (its cgroup, then the chain) and wait for it."""
        await asyncio.to_thread(cgroup.kill_all)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 5)

    async def aclose(self) -> None:
        if self.template is not None:
            await self.template.aclose()
        for node_id in list(self._pidfds):
            self._forget_pidfd(node_id)
        await super().aclose()

    async def list(self, manager_id: str) -> list[NodeInfo]:
        infos = await super().list(manager_id)
        listed = {i.node_id for i in infos}
        held = list(self._pidfds.items())
        for node_id in [n for n, (_key, _fd, owner) in held if owner == manager_id and n not in listed]:
            self._forget_pidfd(node_id)  # removed since: its pidfd goes with it
        return infos

    def _alive(self, mark: dict[str, Any]) -> psutil.Process | None:
        """The node's process, if it still runs: same pid, same start time, in the node's cgroup."""
        proc = _process(mark.get("pid"), mark.get("create_time"))
        if proc is None:
            return None
        if not self._cgroup(mark["node_id"]).holds(proc.pid):
            return None
        return proc

    def _running(self, mark: dict[str, Any]) -> bool:
        """``_alive`` for every list: once a node's process has passed it, a pidfd of that very
        process answers (one poll, and no pid reuse can fool it) until the process ends."""
        node_id, key = mark["node_id"], (mark.get("pid"), mark.get("create_time"))
        with self._pidfd_lock:  # lists and inspects run in threads: an fd is closed once
            held = self._pidfds.get(node_id)
            if held is not None:
                if held[0] == key and not _ended(held[1]):
                    return True
                self._forget_pidfd(node_id)
            proc = self._alive(mark)
            if proc is None or len(self._pidfds) >= self._pidfd_budget:
                return proc is not None
            try:
                fd = os.pidfd_open(proc.pid)
            except OSError:
                return False
            if self._alive(mark) is None:  # ended (and its pid maybe taken) as the pidfd was opened
                os.close(fd)
                return False
            self._pidfds[node_id] = (key, fd, mark["manager_id"])
            return True

    def _forget_pidfd(self, node_id: str) -> None:
        with self._pidfd_lock:
            held = self._pidfds.pop(node_id, None)
            if held is not None:
                os.close(held[1])

    def _info(
        self, mark: dict[str, Any], status: str, health: str = "Unknown", detail: str | None = None
    ) -> NodeInfo:
        node_dir = Path(mark["dir"])
        state = {"node_id": mark["node_id"], "dir": mark["dir"], "pid": mark.get("pid")}
        return NodeInfo(
            node_id=mark["node_id"],
            manager_id=mark["manager_id"],
            status=status,
            health=health,
            host=UNIX_PREFIX + str(socket_path(node_dir)),
            port=0,
            state=state,
            detail=detail,
        )

    def _observe(self, mark: dict[str, Any]) -> NodeInfo:
        if mark.get("pid") is None:
            return self._info(mark, CREATED)
        cgroup = self._cgroup(mark["node_id"])
        reason = cgroup.reason()
        if self._running(mark):
            if cgroup.frozen():
                return self._info(mark, PAUSED, self._health_of(mark), reason)
            return self._info(mark, RUNNING, STARTING, reason)
        info = super()._observe(mark)
        if info.status == RUNNING:  # alive by pid but not in its cgroup: not ours
            info.status = EXITED
        if reason:
            info.detail = reason if info.detail is None else f"{reason}, {info.detail}"
        return info

    @staticmethod
    def _exit_detail(code: int) -> str:
        """bwrap ends with 128 + N when the node died of signal N (and the template's waiter with
        137 when the server ended without a status: SIGKILL, by the kernel's OOM killer or kill -9)."""
        if 128 < code <= 128 + signal.SIGRTMAX:
            return f"killed by signal {code - 128}"
        return ProcessRuntime._exit_detail(code)

    def _health_of(self, mark: dict[str, Any]) -> str:
        return HEALTHY if mark["node_id"] in self._healthy_once else STARTING

    async def _terminate(self, mark: dict[str, Any], grace: float) -> None:
        """SIGTERM the node's processes (not the sandbox's own), SIGKILL all of its cgroup after
        ``grace``; without cgroups, the tree of the node's verified process."""
        node_id = mark["node_id"]
        cgroup = self._cgroup(node_id)
        proc = self._alive(mark) if mark.get("pid") else None
        if proc is not None and grace > 0:
            await asyncio.to_thread(cgroup.freeze, False)
            await asyncio.to_thread(self._signal_node, proc, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and self._alive(mark) is not None:
                await asyncio.sleep(0.05)
        if proc is not None and not cgroup.available():
            with contextlib.suppress(psutil.Error):
                for child in [proc, *proc.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        child.kill()
        await asyncio.to_thread(cgroup.kill_all)
        child = self._children.get(node_id)
        if child is not None and child.pid == mark.get("pid"):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(child.wait(), 5)
        if mark.get("pid"):
            self._reaped.add((node_id, mark["pid"]))

    @staticmethod
    def _signal_node(proc: psutil.Process, sig: int) -> None:
        """``sig`` to the node's server only, as ``docker stop`` signals a container's first process:
        the first process below the sandbox's own wrappers (bwrap, pasta, ...), which would kill the
        node at once instead of letting it shut down, and whose children (a running command) are the
        node's to stop."""
        tree = [proc]
        for pid in _descendants(proc.pid):
            with contextlib.suppress(psutil.Error):
                tree.append(psutil.Process(pid))
        for child in tree:
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                parent = child.parent()
                if child.name() not in _WRAPPERS and parent is not None and parent.name() in _WRAPPERS:
                    child.send_signal(sig)

    async def _reap(self, dead: list[dict[str, Any]]) -> None:
        """Kill what is left in the cgroups of dead nodes, once per death: only processes started
        before the death was seen, since a node being started again joins the same cgroup."""
        new = {(m["node_id"], m["pid"]) for m in dead if m.get("pid")} - self._reaped
        self._reaped &= {(m["node_id"], m.get("pid")) for m in dead}
        seen_at = time.time()
        for node_id, pid in new:
            mark = await asyncio.to_thread(self._read_mark, self._dir({"node_id": node_id}))
            if mark is not None and mark.get("pid") != pid:
                continue  # started again since it was seen dead: the cgroup is the new run's
            await asyncio.to_thread(self._cgroup(node_id).kill_all, 5.0, seen_at)
        self._reaped |= new
