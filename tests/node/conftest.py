"""Fixtures: real node processes (``python -m toolserver node``) and a loopback web server.

``node`` is one node shared by the whole session (kernel tests reuse its kernel); ``make_node``
starts extra nodes where isolation or a special config matters, and stops them afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import yaml

from toolserver.protocol import SECRET_ENV, SECRET_HEADER
from toolserver.testing import free_port

SECRET = "test-node-secret"


class Node:
    """A node process and an HTTP client that carries its secret."""

    def __init__(
        self, workspace: Path, config: dict[str, Any] | None, tmp: Path, env: dict[str, str] | None = None
    ):
        self.workspace = workspace
        self.tmp = tmp
        self.config = config
        self.env = {**os.environ, SECRET_ENV: SECRET, **(env or {})}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = requests.Session()
        self.client.headers[SECRET_HEADER] = SECRET
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / f"node-{self.port}.log"

    def start(self, timeout: float = 20) -> Node:
        cmd = [sys.executable, "-m", "toolserver", "node", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--workspace", str(self.workspace)]
        if self.config is not None:
            config_file = self.tmp / f"node-{self.port}.yml"
            config_file.write_text(yaml.safe_dump(self.config))
            cmd += ["--config", str(config_file)]
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}: {self.log.read_text()}")
            try:
                if requests.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except requests.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError(f"node not healthy after {timeout}s: {self.log.read_text()}")

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.client.close()
        return self.proc.returncode

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 60)
        return self.client.post(f"{self.url}{path}", **kwargs)

    def run(self, tool_name: str, **arguments: Any) -> requests.Response:
        return self.post("/execute_tool", json={"tool_name": tool_name, "arguments": arguments})

    def ok(self, tool_name: str, **arguments: Any) -> Any:
        """The tool's result, unwrapped the way XAgent's client does (binary parts stay dicts)."""
        response = self.run(tool_name, **arguments)
        assert response.status_code == 200, response.text
        return unwrap(response.json())


def unwrap(obj: Any) -> Any:
    if isinstance(obj, dict) and obj.get("type") in ("simple", "composite", "binary") and "data" in obj:
        if obj["type"] == "simple":
            return obj["data"]
        if obj["type"] == "composite":
            return [unwrap(item) for item in obj["data"]]
    return obj


# -- a loopback web server: pages, a fake search API and a fake embeddings API --------------------

PAGE = """<!doctype html><html><head><title>Otter Facts</title>
<style>body { color: red }</style><script>var secretScript = "should not appear";</script></head>
<body><h1>All about otters</h1>
<p>Sea otters hold hands while sleeping so they do not drift apart.</p>
<p>River otters can hold their breath for eight minutes.</p>
<a href="/other.html">Other page</a> <a href="https://example.org/x">External link</a>
</body></html>"""


def _embedding(text: str) -> list[float]:
    """A toy embedding: how often a few marker words occur."""
    words = ["otter", "calculator", "notebook", "file", "shell"]
    lower = text.lower()
    return [float(lower.count(w)) + 0.01 for w in words]


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        port = self.server.server_address[1]
        if parts.path == "/page.html":
            self._send(200, PAGE.encode(), "text/html; charset=utf-8")
        elif parts.path == "/other.html":
            self._send(200, b"<html><body><p>The other page.</p></body></html>", "text/html")
        elif parts.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/page.html")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif parts.path == "/long.html":
            filler = "".join(
                f"<p>Filler paragraph number {i} about nothing in particular.</p>" for i in range(3000)
            )
            body = (
                f"<html><body>{filler}<p>The treasure is buried under the old oak.</p>{filler}</body></html>"
            )
            self._send(200, body.encode(), "text/html")
        elif parts.path == "/image.png":
            self._send(200, b"\x89PNG\r\n\x1a\n" + bytes(100), "image/png")
        elif parts.path == "/bing":
            assert self.headers.get("Ocp-Apim-Subscription-Key") == "bing-key"
            hits = [
                {"name": "Otter Facts", "url": f"http://127.0.0.1:{port}/page.html", "snippet": "otters"},
                {"name": "Other", "url": f"http://127.0.0.1:{port}/other.html", "snippet": "other"},
                {"name": "Missing", "url": f"http://127.0.0.1:{port}/missing", "snippet": "gone"},
            ]
            body = json.dumps({"query": query.get("q", [""])[0], "webPages": {"value": hits}})
            self._send(200, body.encode(), "application/json")
        else:
            self._send(404, b"not here", "text/plain")

    def do_POST(self) -> None:
        if self.path == "/embeddings":
            data = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            items = [{"index": i, "embedding": _embedding(t)} for i, t in enumerate(data["input"])]
            self._send(200, json.dumps({"data": items}).encode(), "application/json")
        else:
            self._send(404, b"", "text/plain")


@pytest.fixture(scope="session")
def web_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# -- extension modules loaded by the shared node --------------------------------------------------

EXTENSION = textwrap.dedent(
    '''
    import sys
    import time
    from typing import Annotated, Literal

    from pydantic import Field

    from toolserver.node.context import NodeContext
    from toolserver.node.registry import Env, tool
    from toolserver.node.results import Binary


    @tool
    def echo_args(
        count: Annotated[int, Field(description="How many items.", ge=0)], mode: Literal["a", "b"] = "a"
    ):
        """Return the arguments it got, as a dict."""
        return {"count": count, "mode": mode}


    @tool(hidden=True)
    def zebra_stripe_counter(zebras: int) -> int:
        """Count the stripes of zebras in a herd.

        Args:
            zebras: number of zebras in the herd
        """
        return zebras * 40


    @tool
    def blocking_sleep(seconds: float) -> str:
        """Sleep in a plain (sync) function."""
        time.sleep(seconds)
        return "slept"


    @tool
    async def mixed_outputs():
        """Several outputs at once."""
        return ("some text", Binary(b"\\x89PNG fake", "image/png", "dot.png"))


    @tool
    def raw_bytes() -> bytes:
        return b"\\x00\\x01\\x02"


    @tool
    def explode() -> None:
        raise RuntimeError("boom from the tool")


    @tool
    def exit_process() -> None:
        sys.exit(3)


    @tool
    def where_am_i(ctx: NodeContext, suffix: str = "") -> str:
        """Return the workspace path."""
        return str(ctx.workspace) + suffix


    class Counter(Env):
        """Counts calls."""

        def __init__(self, ctx):
            super().__init__(ctx)
            self.value = 0

        @tool
        def bump(self, by: int = 1) -> int:
            """Add to the counter."""
            self.value += by
            return self.value
    '''
)


@pytest.fixture(scope="session")
def node_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("node")


@pytest.fixture(scope="session")
def node(node_tmp: Path, web_url: str) -> Iterator[Node]:
    """The shared node: extensions loaded, registration and web search enabled, small limits."""
    ext = node_tmp / "ext_tools.py"
    ext.write_text(EXTENSION)
    broken = node_tmp / "broken_ext.py"
    broken.write_text("raise ImportError('broken on purpose')\n")
    config = {
        "extensions": [str(ext), str(broken), "no_such_module_anywhere"],
        "allow_register_tool": True,
        "web_search_url": f"{web_url}/bing",
        "web_search_api_key": "bing-key",
        "notebook_timeout": 2.5,
        "upload_max_bytes": 1_000_000,
        "max_entries_per_level": 5,
        "max_output_chars": 4000,
        "command_buffer_chars": 2000,
        "command_keepalive_seconds": 0.5,
        "max_terminals": 3,
    }
    started = Node(node_tmp / "workspace", config, node_tmp).start()
    yield started
    started.stop()


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Any]:
    """Start extra nodes: ``make_node(config=None, workspace=None, env=None)``; stopped after the test."""
    nodes: list[Node] = []

    def start(
        config: dict[str, Any] | None = None, workspace: Path | None = None, env: dict[str, str] | None = None
    ) -> Node:
        started = Node(workspace or tmp_path / f"ws{len(nodes)}", config, tmp_path, env).start()
        nodes.append(started)
        return started

    yield start
    for n in nodes:
        n.stop()
