"""Kernel-enforced limits of a sandboxed node: a cgroup (v1) per node and a loop-mounted workspace.

Both are made by the runtime as root, in places the node cannot write: the cgroup directories
under ``<cgroup_root>/<controller>/toolserver/<node_id>`` (memory, pids, cpu when present, and
the freezer for pause), and the workspace image ``<node_dir>/workspace.img`` mounted on
``<node_dir>/disk``. Every function here blocks: the runtime calls them through
``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from toolserver.errors import RuntimeBackendError
from toolserver.runtimes.base import ResourceLimits
from toolserver.runtimes.freezer import set_freezer_state
from toolserver.runtimes.sandbox_config import parse_size

CONTROLLERS = ("memory", "pids", "cpu", "freezer")
#: cgroup directory of every node, under each controller
GROUP = "toolserver"
CFS_PERIOD_US = 100_000
#: seconds the machine's writable controllers are taken as known (every list asks for every node)
CONTROLLERS_TTL = 30.0
_controllers: dict[Path, tuple[float, list[str]]] = {}


@dataclass(frozen=True)
class NodeCgroup:
    """The cgroup of one node: a directory per controller that this machine has and lets us write."""

    root: Path
    node_id: str

    def path(self, controller: str) -> Path:
        return self.root / controller / GROUP / self.node_id

    def available(self) -> list[str]:
        """Controllers whose ``toolserver`` group exists or can be made here (the machine's, the
        same for every node: looked up at most every :data:`CONTROLLERS_TTL` seconds)."""
        now = time.monotonic()
        cached = _controllers.get(self.root)
        if cached is None or cached[0] < now:
            found = []
            for controller in CONTROLLERS:
                base = self.root / controller
                if (base / "cgroup.procs").is_file() and os.access(base, os.W_OK):
                    found.append(controller)
            cached = _controllers[self.root] = (now + CONTROLLERS_TTL, found)
        return list(cached[1])

    def holds(self, pid: int) -> bool:
        """Whether ``pid`` is in the node's group of its first controller (the kernel's list; a node
        process joins every group before the runtime names it, so one group tells)."""
        controllers = self.available()
        if not controllers:
            return True
        with contextlib.suppress(OSError, ValueError):
            text = (self.path(controllers[0]) / "cgroup.procs").read_text()
            return str(pid) in text.split()
        return False

    def create(self, limits: ResourceLimits) -> list[str]:
        """Make the node's groups and set ``limits``; the ``cgroup.procs`` files to join."""
        procs = []
        for controller in self.available():
            group = self.path(controller)
            group.mkdir(parents=True, exist_ok=True)
            if controller == "memory" and limits.memory:
                _write(group / "memory.limit_in_bytes", str(parse_size(limits.memory)))
                with contextlib.suppress(OSError):  # no swap accounting: the limit above suffices
                    _write(group / "memory.memsw.limit_in_bytes", str(parse_size(limits.memory)))
            elif controller == "pids" and limits.pids_limit:
                _write(group / "pids.max", str(limits.pids_limit))
            elif controller == "cpu" and limits.cpus:
                _write(group / "cpu.cfs_period_us", str(CFS_PERIOD_US))
                _write(group / "cpu.cfs_quota_us", str(int(limits.cpus * CFS_PERIOD_US)))
            procs.append(str(group / "cgroup.procs"))
        return procs

    def pids(self) -> list[int]:
        """Every process in the node's groups (the kernel's list: the node cannot forge it)."""
        found: set[int] = set()
        for controller in ("pids", "memory", "freezer", "cpu"):
            with contextlib.suppress(OSError, ValueError):
                text = (self.path(controller) / "cgroup.procs").read_text()
                found.update(int(line) for line in text.split())
        return sorted(found)

    def wait_joined(self, pid: int, timeout: float = 30.0) -> bool:
        """Wait until process ``pid`` is in every group it was given (the join script's first
        act); False when it is gone first or the time is up."""
        groups = [self.path(c) / "cgroup.procs" for c in self.available()]
        deadline = time.monotonic() + timeout
        while True:
            try:
                if all(str(pid) in g.read_text().split() for g in groups):
                    return True
            except OSError:
                return False
            if time.monotonic() >= deadline or not _started(pid):
                return False
            time.sleep(0.001)

    def signal_all(self, sig: int, born_before: float | None = None) -> int:
        """Send ``sig`` to every process of the node (started before ``born_before``, a time as
        ``time.time()``, when given); how many there were."""
        pids = self.pids()
        if born_before is not None:
            pids = [pid for pid in pids if _started(pid) < born_before]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return len(pids)

    def kill_all(self, timeout: float = 5.0, born_before: float | None = None) -> None:
        """SIGKILL every process of the node (started before ``born_before``) until none is left
        (a frozen group is thawed first: a frozen task takes no signal)."""
        with contextlib.suppress(RuntimeBackendError):  # killed still, as far as the kernel lets us
            self.freeze(False)
        deadline = time.monotonic() + timeout
        while self.signal_all(signal.SIGKILL, born_before) and time.monotonic() < deadline:
            time.sleep(0.01)

    def freeze(self, frozen: bool) -> bool:
        """Freeze or thaw the node's processes (RuntimeBackendError when the kernel does not get
        there in time); False when there is no freezer group."""
        group = self.path("freezer")
        if not (group / "freezer.state").exists():
            return False
        set_freezer_state(group, frozen)
        return True

    def frozen(self) -> bool:
        with contextlib.suppress(OSError):
            return (self.path("freezer") / "freezer.state").read_text().strip() == "FROZEN"
        return False

    def reason(self) -> str | None:
        """The limit the node ran into, as Docker would say it (``OOMKilled``), or None."""
        with contextlib.suppress(OSError, ValueError):
            for line in (self.path("memory") / "memory.oom_control").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and int(value) > 0:
                    return "OOMKilled"
        with contextlib.suppress(OSError, ValueError):
            lines = (self.path("pids") / "pids.events").read_text().splitlines()
            events = dict(line.split() for line in lines)
            if int(events.get("max", 0)) > 0:
                limit = (self.path("pids") / "pids.max").read_text().strip()
                return f"pids limit reached ({limit} processes)"
        return None

    def remove(self) -> None:
        """Kill what is left and delete the groups; gone already is fine."""
        self.kill_all()
        for controller in CONTROLLERS:
            with contextlib.suppress(FileNotFoundError):
                self.path(controller).rmdir()


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


# ---- the workspace disk ----------------------------------------------------------------------------


def make_disk(image: Path, mountpoint: Path, size: int, template_dir: Path) -> None:
    """A sparse ext4 image of ``size`` bytes, mounted on ``mountpoint``: a copy of an empty image
    made once per size in ``template_dir`` (copying its few data extents is much cheaper than a
    ``mkfs`` per node)."""
    template = template_dir / f"workspace-{size}.img"
    # one maker at a time, among threads and the worker processes or replicas sharing data_dir
    with open(template_dir / ".workspace.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not template.exists():
            fresh = template.with_suffix(".tmp")
            with open(fresh, "wb") as f:
                f.truncate(size)
            # no journal, no discard (the image is new and sparse), no reserved blocks
            _run("mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal", "-E", "nodiscard", str(fresh))
            fresh.replace(template)
    sparse_copy(template, image)
    mount_disk(image, mountpoint)


def sparse_copy(source: Path, target: Path) -> None:
    """Copy ``source`` to a new ``target``, leaving its holes holes (only data extents are copied)."""
    with open(source, "rb") as src, open(target, "xb") as dst:
        size = os.fstat(src.fileno()).st_size
        dst.truncate(size)
        pos = 0
        while pos < size:
            try:
                start = os.lseek(src.fileno(), pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            end = os.lseek(src.fileno(), start, os.SEEK_HOLE)
            while start < end:
                copied = os.copy_file_range(src.fileno(), dst.fileno(), end - start, start, start)
                if copied <= 0:
                    raise OSError(f"cannot copy {source} to {target}")
                start += copied
            pos = end


def mount_disk(image: Path, mountpoint: Path) -> None:
    """Mount ``image`` on ``mountpoint`` (no device files, no setuid) unless it is mounted already."""
    mountpoint.mkdir(exist_ok=True)
    if not os.path.ismount(mountpoint):
        # noinit_itable: no background zeroing of inode tables (a sparse image reads zeros anyway)
        _run("mount", "-o", "loop,nosuid,nodev,noinit_itable", str(image), str(mountpoint))


def unmount_disk(mountpoint: Path) -> None:
    """Unmount the workspace (lazily: a process still inside cannot keep it); not mounted is fine."""
    if os.path.ismount(mountpoint):
        _run("umount", "-l", str(mountpoint))


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if done.returncode:
        raise OSError(f"{argv[0]} failed: {(done.stderr or done.stdout).strip()}")


def _started(pid: int) -> float:
    """When process ``pid`` started (``time.time()`` scale); 0 when it is gone already."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0
