"""nginx as a plain reverse proxy to one node: the reference for the manager's proxy.

Debian's nginx (installed by ``bench/install_nginx.sh`` when missing) runs in the foreground with
a config written to a temp dir, on a 127.0.0.1 port, one worker (the manager is one process too),
a keep-alive upstream, access log off (the manager runs with ``--log-level warning``, so neither
logs requests) and the node secret injected with ``proxy_set_header``.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from bench.common import REPO
from bench.procs import end, register_root, spawn
from toolserver.testing import free_port, http_ok

INSTALL_SCRIPT = REPO / "bench" / "install_nginx.sh"

CONFIG = """\
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    keepalive_requests 1000000;
    client_max_body_size 0;
    upstream node {{
        server {upstream};
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://node;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-ToolServer-Node-Secret "{secret}";
            proxy_request_buffering off;
            proxy_buffering off;
        }}
    }}
}}
"""


def nginx_binary() -> str | None:
    return shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None  # not on a user's PATH
    )


def ensure_nginx() -> tuple[str | None, str]:
    """The nginx binary, installing Debian's package when missing; (None, why) when impossible."""
    binary = nginx_binary()
    if binary:
        return binary, ""
    done = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=600)
    binary = nginx_binary()
    if binary is None:
        return None, f"nginx could not be installed: {done.stderr.strip()[-500:]}"
    return binary, ""


class Nginx:
    """``with Nginx(root, "127.0.0.1:1234", secret) as proxy: proxy.port``."""

    def __init__(self, binary: str, root: Path, upstream: str, secret: str) -> None:
        self.binary = binary
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        register_root(root)
        self.port = free_port()
        self.conf = root / "nginx.conf"
        self.conf.write_text(CONFIG.format(root=root, upstream=upstream, port=self.port, secret=secret))
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Nginx:
        argv = [self.binary, "-p", str(self.root), "-c", str(self.conf), "-g", "daemon off;"]
        self.proc = spawn(argv, self.root / "stdout.log", cwd=self.root)
        deadline = time.monotonic() + 15
        while not http_ok(f"http://127.0.0.1:{self.port}/health"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                errors = (self.root / "error.log").read_text(errors="replace")[-1000:]
                raise RuntimeError(f"nginx did not start: {errors}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            end(self.proc, timeout=10)
