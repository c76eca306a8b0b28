"""The command line's client commands and ``nodes`` listing against a real manager, as subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ManagerProcess, free_port
from toolserver.cli import main

BASE_ENV = {k: v for k, v in os.environ.items() if not k.startswith("TOOLSERVER_")}


def toolserver(*argv: str | Path, cwd: Path, url: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m toolserver ARGV``; ``url`` goes in through ``$TOOLSERVER_URL``."""
    env = BASE_ENV | ({"TOOLSERVER_URL": url} if url else {})
    return subprocess.run(
        [sys.executable, "-m", "toolserver", *map(str, argv)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_session_workflow(manager: ManagerProcess, tmp_path: Path) -> None:
    url = ["--url", manager.url]
    node_id = ok(toolserver("session", "new", *url, cwd=tmp_path)).strip()
    assert manager.node(node_id) is not None and "\n" not in node_id

    run = ["exec", "--session", node_id, *url, "calculator"]
    assert ok(toolserver(*run, '{"expression": "6*7"}', cwd=tmp_path)).strip() == "42"
    assert ok(toolserver(*run, "expression=2**10", cwd=tmp_path)).strip() == "1024"
    listed = ok(toolserver("tools", "--session", node_id, *url, cwd=tmp_path)).splitlines()
    assert any(line.split()[0] == "calculator" for line in listed)

    data = bytes(range(256)) * 64
    (tmp_path / "blob.bin").write_bytes(data)
    assert ok(toolserver("upload", node_id, "blob.bin", "--as", "copy.bin", *url, cwd=tmp_path)).strip()
    ok(toolserver("download", *url, node_id, "copy.bin", "back.bin", cwd=tmp_path))
    assert (tmp_path / "back.bin").read_bytes() == data

    table = ok(toolserver("nodes", "--config", manager.config_path, cwd=tmp_path))
    short_id = manager.node(node_id)["short_id"]
    assert short_id in table and node_id[:8] + "…" in table and node_id not in table

    ok(toolserver("session", "release", node_id, *url, cwd=tmp_path))
    assert manager.node(node_id) is None


def test_one_off_exec_and_errors(manager: ManagerProcess, tmp_path: Path) -> None:
    # without --session: a temporary session, released afterwards; the URL from $TOOLSERVER_URL
    assert ok(toolserver("exec", "calculator", "expression=6*7", cwd=tmp_path, url=manager.url)) == "42\n"
    assert manager.nodes() == []

    unknown = toolserver("exec", "--session", "nosuchsession", "calculator", cwd=tmp_path, url=manager.url)
    assert unknown.returncode == 1
    assert unknown.stderr == "toolserver: 403 invalid node_id: nosuchsession\n"

    bad = toolserver("exec", "calculator", "expression", cwd=tmp_path, url=manager.url)
    assert bad.returncode == 2
    assert "'expression' is neither a JSON object nor key=value" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert manager.nodes() == []

    dead = f"http://127.0.0.1:{free_port()}"
    down = toolserver("session", "new", "--url", dead, cwd=tmp_path)
    assert down.returncode == 1
    assert f"cannot reach the manager at {dead}" in down.stderr and "Traceback" not in down.stderr


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    commands = ["nodes", "session", "session new", "session release", "sessions", "run", "shell", "tools"]
    commands += ["exec", "upload", "download"]
    for command in [*commands, "download-workspace"]:
        with pytest.raises(SystemExit) as exit_:
            main([*command.split(), "--help"])
        assert exit_.value.code == 0, command
        assert ("--url" in capsys.readouterr().out) != (command == "nodes"), command


def test_a_cookie_never_begins_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cookie beginning with "-" (one in 64 did) was taken for an option after ``--session``."""
    from toolserver.manager import models

    drawn = iter(["-OAksMPktYU_qPxM7k", "OAksMPktYU_qPxM7k"])
    monkeypatch.setattr(models.secrets, "token_urlsafe", lambda nbytes: next(drawn))
    assert models.new_token() == "OAksMPktYU_qPxM7k"
