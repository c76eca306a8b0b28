"""Whether the Docker runtime can be benchmarked here, and a bare ``docker run`` as its reference."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import time
from dataclasses import dataclass

from bench.procs import LABEL_MANAGER
from toolserver.testing import http_ok
from toolserver.testing.tiers import node_image

#: The image the Docker tier runs ($TOOLSERVER_NODE__IMAGE, default toolserver-node:latest).
IMAGE = node_image()
NODE_PORT = 31942


def _docker(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)


def unavailable_reason(image: str = IMAGE) -> str | None:
    """None when the Docker runtime can run here; otherwise why not (for the skip note)."""
    if shutil.which("docker") is None:
        return "the docker CLI is not installed"
    try:
        if _docker("info", timeout=30).returncode != 0:
            return "`docker info` fails (no Docker Engine answers; `make docker-ready` starts one)"
        if _docker("image", "inspect", image, timeout=30).returncode != 0:
            return f"the image {image} is missing (`make node-image` builds it)"
    except subprocess.TimeoutExpired:
        return "`docker info` timed out"
    if importlib.util.find_spec("toolserver.runtimes.docker") is None:
        return "toolserver.runtimes.docker is not there yet"
    return None


@dataclass
class BareContainer:
    """One container of the node image started by hand, for the reference timing."""

    label: str
    secret: str = "bench-secret"
    cid: str = ""
    #: a container runtime of dockerd (``runsc`` for the gvisor tier's reference), else its default
    runtime: str | None = None

    def start_to_healthy(self, timeout: float = 60.0) -> float:
        """``docker run -d [--runtime R]``, then poll ``GET /health`` on its published port; seconds."""
        t0 = time.perf_counter()
        run = _docker(
            "run",
            "-d",
            "--label",
            f"{LABEL_MANAGER}={self.label}",
            "-e",
            f"TOOLSERVER_NODE_SECRET={self.secret}",
            "-p",
            f"127.0.0.1::{NODE_PORT}",
            *(["--runtime", self.runtime] if self.runtime else []),
            IMAGE,
        )
        if run.returncode != 0:
            raise RuntimeError(f"docker run failed: {run.stderr.strip()}")
        self.cid = run.stdout.strip()
        port = ""
        deadline = time.monotonic() + timeout
        while not port:
            port = _docker("port", self.cid, f"{NODE_PORT}/tcp").stdout.strip().rsplit(":", 1)[-1]
            if time.monotonic() > deadline:
                raise RuntimeError("container published no port")
        while not http_ok(f"http://127.0.0.1:{port}/health"):
            if time.monotonic() > deadline:
                raise RuntimeError("container not healthy in time")
            time.sleep(0.01)
        return time.perf_counter() - t0

    def remove(self) -> None:
        if self.cid:
            _docker("rm", "-f", "-v", self.cid, timeout=120)
            self.cid = ""
