"""Freezing a local node's processes with their memory (pause and resume of the process tiers).

Preferred: a cgroup v1 freezer group per node, ``/sys/fs/cgroup/freezer/toolserver/<node_id>``,
made when the node starts (its server joins it, so everything it spawns is in it too); freezing
writes ``FROZEN`` to its ``freezer.state`` and waits until the kernel reports every task frozen.
Where that hierarchy is not writable (no v1 freezer, no privilege), the node's marked processes
get SIGSTOP and SIGCONT instead: the same effect for the node's tools, though a process could
see the stop (a debugger's ``SIGCHLD``) where the freezer is invisible.

Processes are found by the runtime's own mark (an environment variable the runtime sets), never
by a pid the node reports. Every call blocks on the file system or signals: call it from
``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from toolserver.errors import RuntimeBackendError

log = logging.getLogger(__name__)

FREEZER_ROOT = Path("/sys/fs/cgroup/freezer")
#: Longest wait for the kernel to report a group frozen.
FREEZE_WAIT = 10.0

Marked = Callable[[str], list[psutil.Process]]


def set_freezer_state(group: Path, frozen: bool, wait: float = FREEZE_WAIT) -> None:
    """Freeze or thaw the cgroup v1 freezer ``group`` and wait until the kernel says it is done
    (every task frozen); a freeze that does not finish in ``wait`` is undone and raises
    RuntimeBackendError, as does a group that cannot be written."""
    want = "FROZEN" if frozen else "THAWED"
    state = group / "freezer.state"
    try:
        state.write_text(want)
        deadline = time.monotonic() + wait
        while state.read_text().strip() != want:
            if time.monotonic() > deadline:
                if frozen:
                    state.write_text("THAWED")
                raise RuntimeBackendError(f"cgroup {group.name} did not reach {want} within {wait:g} s")
            time.sleep(0.005)
    except OSError as exc:
        raise RuntimeBackendError(f"cannot set cgroup {group.name} {want}: {exc}") from exc


class Freezer:
    """Freezes and thaws the processes of one node, by cgroup freezer or by signals."""

    def __init__(self, marked: Marked, root: Path = FREEZER_ROOT) -> None:
        self.marked = marked
        self.base = root / "toolserver"
        self.cgroup = self._usable(root)
        if not self.cgroup:
            log.info("cgroup v1 freezer not writable at %s: pausing nodes with SIGSTOP/SIGCONT", root)

    def _usable(self, root: Path) -> bool:
        try:
            if not (root / "cgroup.procs").exists():
                return False
            self.base.mkdir(exist_ok=True)
            return (self.base / "freezer.state").exists() and os.access(self.base / "cgroup.procs", os.W_OK)
        except OSError:
            return False

    @property
    def method(self) -> str:
        """``cgroup`` or ``signals``: how this machine's nodes are paused."""
        return "cgroup" if self.cgroup else "signals"

    def group(self, node_id: str) -> Path:
        return self.base / node_id

    def join(self, node_id: str, pid: int) -> None:
        """Put process ``pid`` (a node's server, just started by the runtime) in the node's group."""
        if not self.cgroup:
            return
        try:
            group = self.group(node_id)
            group.mkdir(exist_ok=True)
            (group / "cgroup.procs").write_text(str(pid))
        except OSError as exc:  # it still runs; a pause falls back to moving its marked processes
            log.warning("node %s: cannot join freezer group: %s", node_id, exc)

    def freeze(self, node_id: str) -> None:
        """Freeze every process of the node; RuntimeBackendError when that cannot be done."""
        if not self.cgroup:
            self._signal(self.marked(node_id), signal.SIGSTOP)
            return
        group = self.group(node_id)
        try:
            group.mkdir(exist_ok=True)
            if not (group / "cgroup.procs").read_text().strip():  # never joined: gather its processes
                for proc in self.marked(node_id):
                    with contextlib.suppress(ProcessLookupError, OSError):
                        (group / "cgroup.procs").write_text(str(proc.pid))
        except OSError as exc:
            raise RuntimeBackendError(f"cannot freeze node {node_id}: {exc}") from exc
        set_freezer_state(group, True)

    def thaw(self, node_id: str) -> None:
        """Thaw the node's processes (nothing to do when they are not frozen)."""
        if not self.cgroup:
            self._signal(self.marked(node_id), signal.SIGCONT)
            return
        group = self.group(node_id)
        if group.exists():
            set_freezer_state(group, False)

    def frozen(self, node_id: str) -> bool:
        """Whether the node's group is frozen (with signals: whether its processes are stopped)."""
        if not self.cgroup:
            procs = self.marked(node_id)
            with contextlib.suppress(psutil.Error):
                return bool(procs) and all(p.status() == psutil.STATUS_STOPPED for p in procs)
            return False
        try:
            return (self.group(node_id) / "freezer.state").read_text().strip() != "THAWED"
        except OSError:
            return False

    def discard(self, node_id: str) -> None:
        """Thaw and remove the node's group (its processes are gone or about to be killed)."""
        self.thaw(node_id)
        if self.cgroup:
            with contextlib.suppress(OSError):
                self.group(node_id).rmdir()

    @staticmethod
    def _signal(procs: list[psutil.Process], sig: int) -> None:
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
