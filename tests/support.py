"""Helpers shared by the test suites: the harness from :mod:`toolserver.testing` plus test-only pieces."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import psutil
import pytest

from toolserver import testing
from toolserver.testing import (
    free_port,
    http_ok,
    node_processes,
    processes_under,
    scratch_config,
    wait_until,
)
from toolserver.testing.tiers import docker_unavailable_reason, marked_processes, node_image

__all__ = [
    "NODE_IMAGE",
    "ManagerProcess",
    "PostgresServer",
    "Tmux",
    "check_fuzzed_answer",
    "config_refusal",
    "docker_containers",
    "docker_unavailable_reason",
    "docker_volumes",
    "free_port",
    "fuzz_settings",
    "http_ok",
    "inprocess_manager",
    "marked_processes",
    "node_processes",
    "processes_under",
    "remove_docker_networks",
    "sleeping",
    "terminal_transcript",
    "until_async",
    "wait_until",
]


class ManagerProcess(testing.ManagerProcess):
    """The harness's manager, checking node health every 0.2 s so tests see failures quickly."""

    node_defaults: ClassVar[dict[str, Any]] = {"health_check_interval": 0.2, "stop_grace_seconds": 2}


def config_refusal(config_path: Path) -> subprocess.CompletedProcess[str]:
    """Run ``toolserver manager --config config_path`` for a config that must stop it at once."""
    return subprocess.run(
        [sys.executable, "-m", "toolserver", "manager", "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@contextlib.asynccontextmanager
async def inprocess_manager(root: Path, runtime_factory: Any = None, **config: Any) -> Any:
    """A manager served by uvicorn inside the test's event loop, optionally with an injected runtime
    (``runtime_factory(config, context)``, a runtime class say, made from the loaded settings).

    Yields ``(url, app)``. Used where a test injects a fault through a runtime subclass.
    """
    import asyncio

    import uvicorn

    from toolserver.manager.app import create_app
    from toolserver.manager.settings import load_settings

    port = free_port()
    node = {"health_check_interval": 0.1, "stop_grace_seconds": 1, **config.pop("node", {})}
    settings = load_settings(
        None,
        port=port,
        **scratch_config(root),
        manager_id=testing.unique_manager_id(port),
        node=node,
        **config,
    )
    runtime = (
        runtime_factory(settings.runtime_config, settings.runtime_context()) if runtime_factory else None
    )
    app = create_app(settings, runtime=runtime)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        await task


NODE_IMAGE = node_image()


def docker_volumes(label: str) -> list[str]:
    """Names of the volumes carrying ``label`` (key=value)."""
    out = subprocess.run(
        ["docker", "volume", "ls", "-q", "--filter", f"label={label}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return out.split()


def docker_containers(label: str) -> list[dict[str, str]]:
    """``docker ps -a`` rows (ID, State, Names) of containers carrying ``label`` (key=value)."""
    out = subprocess.run(
        ["docker", "ps", "-a", "--filter", f"label={label}", "--format", "{{.ID}} {{.State}} {{.Names}}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return [dict(zip(("id", "state", "name"), line.split(), strict=True)) for line in out.splitlines()]


def remove_docker_networks(label: str) -> list[str]:
    """Remove the networks carrying ``label`` (a Docker tier's node network: the runtime drops it
    with its last node, but not when a test removed the containers behind its back)."""
    out = subprocess.run(
        ["docker", "network", "ls", "-q", "--filter", f"label={label}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout.split()
    for net in out:
        subprocess.run(["docker", "network", "rm", net], capture_output=True, timeout=60, check=False)
    return out


PG_BIN = Path("/usr/lib/postgresql")


def _pg_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(PG_BIN.glob(f"*/bin/{name}")) if PG_BIN.exists() else []
    return str(versions[-1]) if versions else None


class PostgresServer:
    """A throwaway PostgreSQL server on 127.0.0.1, run as the postgres user when we are root."""

    def __init__(self) -> None:
        initdb, pg_ctl = _pg_tool("initdb"), _pg_tool("pg_ctl")
        if not (initdb and pg_ctl):
            pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
        self.pg_ctl = pg_ctl
        self.root = Path(tempfile.mkdtemp(prefix="toolserver-pg-"))  # not under pytest's 0700 tree
        self.data = self.root / "data"
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            shutil.chown(self.root, "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.port = free_port()
        self.url = f"postgresql+asyncpg://toolserver@127.0.0.1:{self.port}/postgres"
        subprocess.run(
            [*self.as_user, initdb, "-D", str(self.data), "-U", "toolserver", "--auth=trust", "-E", "UTF8"],
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        options = f"-h 127.0.0.1 -p {self.port} -k {self.root}"
        log = str(self.root / "pg.log")
        subprocess.run(
            [*self.as_user, self.pg_ctl, "-D", str(self.data), "-l", log, "-w", "start", "-o", options],
            check=True,
            capture_output=True,
        )

    def stop(self) -> None:
        subprocess.run(
            [*self.as_user, self.pg_ctl, "-D", str(self.data), "-m", "immediate", "stop"], capture_output=True
        )

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def rows(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        """Run ``sql`` (``$1``-style parameters) on the server's database, as an operator would."""
        import asyncio

        import asyncpg

        async def run() -> list[dict[str, Any]]:
            con = await asyncpg.connect(
                host="127.0.0.1", port=self.port, user="toolserver", database="postgres"
            )
            try:
                return [dict(r) for r in await con.fetch(sql, *args)]
            finally:
                await con.close()

        return asyncio.run(run())


class Tmux:
    """A tmux server of the test's own (``-L``) running one command in a window of a given size.

    ``keys`` types (tmux key names: ``Enter``, ``C-d``), ``screen`` reads the pane as shown,
    ``wait_for`` polls the screen for a text. The server is killed on :meth:`close`.
    """

    def __init__(self, command: str, cols: int = 100, rows: int = 30) -> None:
        import shutil
        import uuid

        if shutil.which("tmux") is None:
            import pytest

            pytest.skip("tmux is not installed (scripts/ensure-tmux.sh installs it)")
        self.socket = f"toolserver-test-{uuid.uuid4().hex[:8]}"
        self._tmux("new-session", "-d", "-s", "t", "-x", str(cols), "-y", str(rows), command)
        self._tmux("set-option", "-t", "t", "remain-on-exit", "on")

    def _tmux(self, *args: str) -> str:
        done = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)} failed: {done.stderr}")
        return done.stdout

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "t", *keys)

    def resize(self, cols: int, rows: int) -> None:
        self._tmux("resize-window", "-t", "t", "-x", str(cols), "-y", str(rows))

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "t")

    def wait_for(self, text: str, timeout: float = 30.0) -> str:
        def shown() -> str | None:
            screen = self.screen()
            return screen if text in screen else None

        try:
            return str(wait_until(shown, timeout, what=f"{text!r} on the screen"))
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the screen shows:\n{self.screen()}") from None

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30)

    def __enter__(self) -> Tmux:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sleeping(*seconds: str) -> list[psutil.Process]:
    """The live ``sleep SECONDS`` processes (tests pick numbers no one else sleeps)."""
    wanted = [["sleep", s] for s in seconds]
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["cmdline"] in wanted and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


async def until_async(predicate: Any, within: float = 30.0, what: str = "condition") -> Any:
    """:func:`wait_until` for async tests: polls ``predicate`` without blocking the loop."""
    import asyncio
    import time

    deadline = time.monotonic() + within
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:g} s waiting for {what}")
        await asyncio.sleep(0.05)
    return value


async def terminal_transcript(ws: Any, keys: bytes) -> tuple[str, dict[str, Any] | None]:
    """Type ``keys`` into a terminal WebSocket and read until it closes: (screen text, last control)."""
    import json

    import aiohttp

    await ws.send_bytes(keys)
    text, control = "", None
    async for message in ws:
        if message.type == aiohttp.WSMsgType.BINARY:
            text += message.data.decode(errors="replace")
        else:
            control = json.loads(message.data)
    return text, control


def check_fuzzed_answer(case: Any, response: Any, may_fail: Callable[[Any], bool] | None = None) -> None:
    """What every fuzzed answer must hold: no 5xx but a documented 503/504 (or one ``may_fail``
    accepts), and no traceback in the body."""
    status = response.status_code
    documented = case.operation.definition.raw.get("responses", {})
    text = response.content.decode("utf-8", "replace")  # downloads are bytes
    where = f"{case.method} {case.path} -> {status}: {text[:300]}"
    # the server's own (a notebook cell's error output is the agent's result, not a crash)
    assert 'Traceback (most recent call last):\n  File "' not in text, where
    if status >= 500:
        assert str(status) in documented, f"undocumented {where}"
        assert status in (503, 504) or (may_fail is not None and may_fail(response)), where


def fuzz_settings(max_examples: int) -> Any:
    """Hypothesis settings of the fuzzing tests: bounded, no example database, no deadline."""
    from hypothesis import HealthCheck, Phase, settings

    return settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
