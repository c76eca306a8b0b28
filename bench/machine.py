"""What the benchmarks ran on: cores, CPU, memory, Python, OS, load, versions, commit, date."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from bench.common import REPO


def _run(*argv: str) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
        return (done.stdout or done.stderr).strip()
    return ""


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def describe() -> dict[str, Any]:
    commit = _run("git", "-C", str(REPO), "rev-parse", "--short", "HEAD")
    dirty = bool(_run("git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": _run("nproc") or str(os.cpu_count()),
        "cpu": cpu_model(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": sys.version.split()[0],
        "os": f"{platform.system()} {platform.release()}",
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "commit": commit + (" (uncommitted changes)" if dirty else ""),
        "nginx": _run(nginx, "-v") if Path(nginx).exists() else "not installed",
        "docker": _run("docker", "version", "--format", "{{.Server.Version}}") or "not available",
    }
