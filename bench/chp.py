"""JupyterHub's configurable-http-proxy in front of one node: the second reference for the proxy.

The npm package is installed into ``build/chp`` (``npm install --prefix build/chp
configurable-http-proxy``, Node.js from the machine) the first time the benchmark needs it; never
globally. It runs on a 127.0.0.1 port with its default route to the node, the node secret added
with ``--custom-header``, its API on another loopback port and its log at ``warn`` (it logs no
request then, as neither nginx nor the manager do).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from bench.common import REPO
from bench.procs import end, register_root, spawn
from toolserver.testing import free_port, http_ok

PACKAGE = "configurable-http-proxy"
PREFIX = REPO / "build" / "chp"
BINARY = PREFIX / "node_modules" / ".bin" / PACKAGE


def ensure_chp() -> tuple[str | None, str]:
    """The proxy's executable, installing the npm package into build/chp when missing; (None, why)."""
    if BINARY.exists():
        return str(BINARY), ""
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        return None, "Node.js (node and npm) is not installed"
    PREFIX.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [npm, "install", "--prefix", str(PREFIX), "--no-audit", "--no-fund", PACKAGE],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if not BINARY.exists():
        return None, f"npm could not install {PACKAGE}: {done.stderr.strip()[-500:]}"
    return str(BINARY), ""


def chp_version(binary: str) -> str:
    done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60, check=False)
    return done.stdout.strip() or "?"


class ConfigurableHttpProxy:
    """``with ConfigurableHttpProxy(binary, root, "127.0.0.1:1234", secret) as proxy: proxy.port``."""

    def __init__(self, binary: str, root: Path, upstream: str, secret: str) -> None:
        self.binary = binary
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        register_root(root)
        self.port = free_port()
        self.api_port = free_port()
        self.upstream = upstream
        self.secret = secret
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ConfigurableHttpProxy:
        argv = [
            self.binary,
            "--ip", "127.0.0.1",
            "--port", str(self.port),
            "--api-ip", "127.0.0.1",
            "--api-port", str(self.api_port),
            "--default-target", f"http://{self.upstream}",
            "--custom-header", f"X-ToolServer-Node-Secret: {self.secret}",
            "--no-x-forward",
            "--log-level", "warn",
        ]  # fmt: skip
        self.proc = spawn(
            argv, self.root / "chp.log", env={**os.environ, "CONFIGPROXY_AUTH_TOKEN": "bench"}, cwd=self.root
        )
        deadline = time.monotonic() + 30
        while not http_ok(f"http://127.0.0.1:{self.port}/health"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.root / "chp.log").read_text(errors="replace")[-1000:]
                raise RuntimeError(f"configurable-http-proxy did not start: {log}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            end(self.proc, timeout=10)
