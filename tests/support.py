"""Helpers shared by the test suites: the harness from :mod:`toolserver.testing` plus test-only pieces."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

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
        manager_id=f"test-{port}",
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
