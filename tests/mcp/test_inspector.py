"""The MCP Inspector's command-line mode (npm ``@modelcontextprotocol/inspector``, pinned by
``scripts/ensure-inspector.sh``) lists and calls a tool against ``/mcp``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mcp.conftest import assert_nothing_leaked
from tests.support import ManagerProcess

ROOT = Path(__file__).resolve().parents[2]
INSPECTOR = ROOT / "build" / "inspector" / "node_modules" / ".bin" / "mcp-inspector"


def _unavailable() -> str | None:
    if shutil.which("node") is None:
        return "Node.js is missing: the MCP Inspector runs on it"
    if not INSPECTOR.exists():
        return f"the MCP Inspector is not installed at {INSPECTOR}: run bash scripts/ensure-inspector.sh"
    return None


pytestmark = pytest.mark.skipif(_unavailable() is not None, reason=_unavailable() or "")


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagerProcess]:
    # the Inspector leaves its sessions open: they end, and release their nodes, after 3 s idle
    root = tmp_path_factory.mktemp("inspector") / "manager"
    manager = ManagerProcess(root, mcp={"session_idle_minutes": 0.05})
    manager.start()
    try:
        yield manager
    finally:
        assert not manager.cleanup()


def _inspect(manager: ManagerProcess, home: Path, *args: str) -> dict:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),  # its catalog and settings stay in the test's directory
        "MCP_CATALOG_PATH": str(home / "catalog.json"),
        "NO_COLOR": "1",
    }
    argv = [str(INSPECTOR), "--cli", manager.url + "/mcp", "--transport", "http", *args]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, cwd=home)
    assert done.returncode == 0, f"inspector failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout)


def test_inspector_lists_and_calls_a_tool(manager: ManagerProcess, tmp_path: Path) -> None:
    listed = _inspect(manager, tmp_path, "--method", "tools/list")
    tools = {t["name"]: t for t in listed["tools"]}
    assert tools["calculator"]["inputSchema"]["required"] == ["expression"]

    call = ["--method", "tools/call", "--tool-name", "calculator", "--tool-arg", "expression=6*7"]
    called = _inspect(manager, tmp_path, *call)
    assert called["content"] == [{"type": "text", "text": "42"}] and called["isError"] is False
    assert_nothing_leaked(manager)
