"""Sampling profiles with py-spy (``pip install -e '.[bench]'``) and a plain-text summary of them.

``python -m bench --profile`` attaches py-spy to the manager (or runs the checker under it)
during the measurements that have a target, writes the raw collapsed stacks to
``bench/results/*.pyspy.txt`` and puts the hottest functions in the JSON results. Without py-spy,
or where ptrace is not allowed, profiling is skipped with a note.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import REPO
from bench.procs import end, spawn

#: Frames every sample of the manager passes through; left out of the inclusive list.
ENTRY_POINTS = ("<module> ", "main (toolserver/cli.py)", "serve_manager ", "create_app.<locals>.forward ")


#: Leaf frames where a thread only waits for work (py-spy can count such threads as active).
WAITING = (
    "_connection_worker_thread (aiosqlite/core.py:59)",  # tx.get(): the aiosqlite thread is idle
    "select (selectors.py:",
    "wait (threading.py:",
)


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


@contextlib.contextmanager
def attach(pid: int, out: Path, rate: int = 200) -> Iterator[dict[str, Any]]:
    """Record ``pid`` until the block ends; yields a dict later holding ``summary`` (or ``error``)."""
    found = py_spy()
    info: dict[str, Any] = {"raw": str(out)}
    if found is None:
        info["error"] = "py-spy is not installed (pip install -e '.[bench]')"
        yield info
        return
    argv = [found, "record", "-p", str(pid), "-r", str(rate), "--format", "raw", "-o", str(out)]
    proc = spawn([*argv, "--nonblocking"], out.with_suffix(".log"))
    try:
        yield info
    finally:
        end(proc, sig=signal.SIGINT, timeout=30)  # SIGINT: py-spy writes its output and exits
        if out.exists():
            info["summary"] = summarize(out)
        else:
            info["error"] = (
                "py-spy wrote nothing: " + out.with_suffix(".log").read_text(errors="replace")[-300:]
            )


def run_under(argv: list[str], out: Path, timeout: float, rate: int = 200) -> dict[str, Any]:
    """Run ``argv`` under ``py-spy record``; returns the summary."""
    found = py_spy()
    if found is None:
        return {"error": "py-spy is not installed (pip install -e '.[bench]')"}
    cmd = [found, "record", "-r", str(rate), "--format", "raw", "-o", str(out), "--", *argv]
    subprocess.run(cmd, capture_output=True, timeout=timeout, check=False, cwd=REPO)
    return {"raw": str(out), "summary": summarize(out)} if out.exists() else {"error": "no profile written"}


def _frames(stack: str) -> list[str]:
    return [f for f in stack.split(";") if f]


def _short(frame: str) -> str:
    """``func (path/file.py:12)`` -> ``func (path/file.py)``: one entry per function."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def summarize(raw: Path, top: int = 15, focus: str = "toolserver/") -> dict[str, Any]:
    """Hottest functions of a py-spy raw profile: self time, and inclusive time of ``focus`` code."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = waiting = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        raw_frames = _frames(stack)
        if raw_frames and any(w in raw_frames[-1] for w in WAITING):
            waiting += n
            continue
        frames = [_short(f) for f in raw_frames]
        total += n
        if frames:
            own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if total == 0:
        return {"samples": 0, "waiting": waiting}

    def pct(counter: Counter[str], keep: Any) -> list[list[Any]]:
        rows = [(f, c) for f, c in counter.most_common() if keep(f)][:top]
        return [[f, round(100.0 * c / total, 1)] for f, c in rows]

    return {
        "samples": total,
        "waiting": waiting,
        "self_pct": pct(own, lambda f: True),
        "inclusive_pct": pct(inclusive, lambda f: focus in f and not f.startswith(ENTRY_POINTS)),
    }


def describe(summary: dict[str, Any], lines: int = 6) -> str:
    """A few lines for the console and the docs."""
    if not summary.get("samples"):
        return "(no samples)"
    out = [
        f"{summary['samples']} samples (left out: {summary.get('waiting', 0)} of threads waiting for work)"
    ]
    out += [f"  self {p:5.1f}%  {f}" for f, p in summary["self_pct"][:lines]]
    out += [f"  incl {p:5.1f}%  {f}" for f, p in summary["inclusive_pct"][:lines]]
    return "\n".join(out)
