"""The sandbox tier's template: a process that has imported the node's stack once, from which every
new node's server is forked into that node's own sandbox.

A cold node spends most of its start-up importing Python modules (~340 ms here, against ~20 ms
for the sandbox itself). With the template, the sandbox is made exactly as for a cold node (the
same outer bwrap, ``setpriv`` and inner bwrap, see :mod:`toolserver.runtimes.sandbox_jail`), but
what it runs is a tiny *waiter* shell. The template then forks: the child joins the node's
cgroups and every namespace of the waiter (user, mount, PID, network, IPC, UTS, cgroup) through a
pidfd, forks once more so that the server is a process *inside* the node's PID namespace, and that
grandchild drops to the node's uid with no capabilities, no bounding set, ``no_new_privs``, its own
session, the node's environment and descriptors, before it serves. It shares the template's
memory pages until it writes them, so idle nodes cost less too.

The waiter holds the chain together as the node's command did: it exits when its stdin, a pipe
whose only write end the server holds, closes (with the status the server wrote there, or 137 when
it died without writing), and so the sandbox ends with the server, as before.

What a forked node shares with its siblings and is not fresh: the address-space layout (ASLR is
per template, not per node) and the interpreter's string-hash seed. Neither reaches another node:
nodes cannot address each other. The template holds nothing secret (a clean environment, no
config, only imported modules), and is restarted when it dies.

Run as ``python -m toolserver node --template-fd FD`` (so that a node's command line, which its
server inherits, names a node): FD is a SOCK_SEQPACKET socket on
which each request is one JSON message with three descriptors (the listening socket, the log file,
the lifeline's write end); the answer is ``{"started": true}`` or ``{"error": ...}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from toolserver.errors import RuntimeBackendError

log = logging.getLogger(__name__)

#: the waiter: says it is up on its stdout (a pipe; then the log), waits for the server's status
WAITER = 'echo ready; exec >&2; read -r status; exit "${status:-137}"'
#: how long a waiter may take to come up (its sandbox is being made)
READY_SECONDS = 30.0
_CLONE = {
    "user": 0x10000000,
    "mnt": 0x00020000,
    "pid": 0x20000000,
    "net": 0x40000000,
    "ipc": 0x08000000,
    "uts": 0x04000000,
    "cgroup": 0x02000000,
}
_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAPABILITY_VERSION_3 = 0x20080522
#: the modules a node has imported once it serves (see ``toolserver.node.server.serve``)
PRELOAD = (
    "toolserver.node.app",
    "toolserver.node.settings",
    "uvicorn.lifespan.on",
    "uvicorn.loops.uvloop",
    "uvicorn.protocols.http.httptools_impl",
    "uvicorn.protocols.websockets.websockets_sansio_impl",
    "anyio._backends._asyncio",
    "concurrent.futures.thread",
)


# ---- the template process ---------------------------------------------------------------------


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (field 22 of its stat line)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()[19]


def _waiter(request: dict[str, Any]) -> int:
    """A pidfd of the waiter, checked to be the process the runtime named (not a reused pid)."""
    pid = int(request["waiter_pid"])
    pidfd = os.pidfd_open(pid)
    if start_time(pid) != request["waiter_start"]:
        os.close(pidfd)
        raise OSError(f"waiter {pid} is gone")
    return pidfd


def _join(request: dict[str, Any], waiter: int) -> None:
    """In the first child (root, born in the node's PID namespace): the node's cgroups and rlimit,
    no groups, then every other namespace of the waiter."""
    for procs in request["cgroup_procs"]:
        with open(procs, "w") as f:
            f.write("0")  # the writer itself
    if request.get("nproc"):
        import resource

        resource.setrlimit(resource.RLIMIT_NPROC, (request["nproc"], request["nproc"]))
    os.setgroups([])
    flags = 0
    for bit in _CLONE.values():
        flags |= bit
    _check(_libc().setns(waiter, flags), "setns")
    os.close(waiter)


def _drop(request: dict[str, Any], keep: tuple[int, int, int]) -> None:
    """In the server (inside the node's namespaces): the node's uid and nothing else of root's."""
    libc = _libc()
    os.setsid()
    last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in range(last_cap + 1):
        _check(libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0), "PR_CAPBSET_DROP")
    _check(libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "PR_CAP_AMBIENT")
    uid = int(request["uid"])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    header = (ctypes.c_uint32 * 2)(_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable: none, in both halves
    _check(libc.capset(header, data), "capset")
    _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
    _check(libc.prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0), "PR_SET_DUMPABLE")  # as any process of its uid
    os.umask(0o022)
    os.chdir(request["cwd"])
    listen_fd, log_fd, lifeline = keep
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    for fd in (null, log_fd):
        os.close(fd)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in (listen_fd, lifeline):
            try:
                os.close(fd)
            except OSError:
                continue  # the listing's own descriptor
    os.set_inheritable(lifeline, False)
    os.set_inheritable(listen_fd, True)  # serve() keeps it and makes it non-inheritable
    os.environ.clear()
    os.environ.update(request["env"])


def _serve_node(request: dict[str, Any], fds: list[int]) -> int:
    listen_fd, _, lifeline = fds
    status = 1
    try:
        _drop(request, (fds[0], fds[1], fds[2]))
        from toolserver.node.server import serve

        serve(fd=listen_fd, workspace=request["cwd"], config=request.get("config"))
        status = 0
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:  # the node's log says why; the status says it failed
        print(f"toolserver node: cannot start from the template: {exc!r}", file=sys.stderr)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        with contextlib.suppress(OSError):
            os.write(lifeline, f"{status}\n".encode())
    return status


def _fork_node(
    request: dict[str, Any], fds: list[int], control: socket.socket, own_pid_ns: int
) -> dict[str, Any]:
    """Fork the first child in the node's PID namespace; it joins the others and forks the server,
    whose parent, once the first child is gone, is the sandbox's init (as a cold node's is)."""
    result_r, result_w = os.pipe()
    try:
        waiter = _waiter(request)
    except OSError as exc:
        for fd in (*fds, result_r, result_w):
            os.close(fd)
        return {"error": str(exc)}
    libc = _libc()
    _check(libc.setns(waiter, _CLONE["pid"]), "setns")
    try:
        child = os.fork()
    except OSError as exc:
        _check(libc.setns(own_pid_ns, _CLONE["pid"]), "setns back")
        for fd in (*fds, result_r, result_w, waiter):
            os.close(fd)
        return {"error": f"fork: {exc}"}
    if child == 0:  # the first child: never returns
        code = 1
        try:
            control.close()
            os.close(result_r)
            os.close(own_pid_ns)
            _join(request, waiter)
            server = os.fork()
            if server == 0:
                os.close(result_w)
                os._exit(_serve_node(request, fds))
            os.write(result_w, b'{"started": true}')
            code = 0
        except BaseException as exc:  # said to the runtime
            os.write(result_w, json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
        finally:
            os._exit(code)
    _check(libc.setns(own_pid_ns, _CLONE["pid"]), "setns back")  # the next node's is another
    os.close(waiter)
    os.close(result_w)
    for fd in fds:
        os.close(fd)
    chunks = []
    while chunk := os.read(result_r, 4096):
        chunks.append(chunk)
    os.close(result_r)
    os.waitpid(child, 0)
    try:
        return json.loads(b"".join(chunks) or b'{"error": "the template\'s child died"}')
    except ValueError:
        return {"error": "the template's child answered nonsense"}


def main(control_fd: int) -> int:
    """Import the node's stack, then fork a node for every request until the runtime hangs up."""
    _check(_libc().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "PR_SET_PDEATHSIG")
    control = socket.socket(fileno=control_fd)
    own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY)
    import importlib

    from toolserver.node.server import uvicorn_server

    uvicorn_server()
    for name in PRELOAD:
        importlib.import_module(name)
    import gc

    gc.collect()
    gc.freeze()  # what is here now stays shared with the nodes (no collector writes to it)
    control.send(b'{"ready": true}')
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(control, 1 << 16, 3)
        except OSError:
            return 1
        if not message:
            return 0
        try:
            request = json.loads(message)
        except ValueError:
            request = None
        if request is not None and len(fds) == 3:
            answer = _fork_node(request, fds, control, own_pid_ns)  # closes the descriptors
        else:
            for fd in fds:
                os.close(fd)
            answer = {"error": f"a JSON request and 3 descriptors expected, {len(fds)} came"}
        control.send(json.dumps(answer).encode())


# ---- the runtime's side -----------------------------------------------------------------------


class Template:
    """One template process of a runtime, started on first use and again after it died; requests
    go one at a time (a fork takes a few milliseconds)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self._proc: asyncio.subprocess.Process | None = None
        self._control: socket.socket | None = None
        self._lock = asyncio.Lock()

    async def _ensure(self) -> socket.socket:
        if self._control is not None and self._proc is not None and self._proc.returncode is None:
            return self._control
        await self.aclose()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "toolserver",
                "node",
                "--template-fd",
                str(theirs.fileno()),
                env=self.env,
                cwd="/",
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
            )
        finally:
            theirs.close()
        ours.settimeout(READY_SECONDS)
        try:
            hello = await asyncio.to_thread(ours.recv, 1 << 10)
        except OSError as exc:
            ours.close()
            raise RuntimeBackendError(f"the sandbox template did not start: {exc}") from exc
        if not hello:
            ours.close()
            raise RuntimeBackendError("the sandbox template exited as it started")
        self._control = ours
        return ours

    async def spawn(self, request: dict[str, Any], fds: list[int]) -> None:
        """Fork a node server into the waiter's sandbox."""
        async with self._lock:
            for attempt in (1, 2):
                control = await self._ensure()
                try:
                    answer = await asyncio.to_thread(self._ask, control, request, fds)
                    break
                except OSError as exc:  # the template died: once more with a new one
                    await self.aclose()
                    if attempt == 2:
                        raise RuntimeBackendError(f"the sandbox template failed: {exc}") from exc
        if not answer.get("started"):
            raise RuntimeBackendError(f"the sandbox template cannot start the node: {answer.get('error')}")

    def _ask(self, control: socket.socket, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        socket.send_fds(control, [json.dumps(request).encode()], fds)  # spawn's lock: one at a time
        answer = control.recv(1 << 16)
        if not answer:
            raise ConnectionResetError("the sandbox template hung up")
        return json.loads(answer)

    async def aclose(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            try:
                await asyncio.wait_for(proc.wait(), 2)
            except TimeoutError:
                proc.kill()
                await proc.wait()
