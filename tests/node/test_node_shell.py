"""shell_command_executor against real bash: output, timeouts, background shells, kill, limits."""

from __future__ import annotations

import time

import psutil

from .conftest import Node

SH = "shell_command_executor"


def test_runs_in_the_workspace_and_reports_output_and_code(node: Node) -> None:
    result = node.ok(SH, command="pwd; echo out; echo err >&2; exit 3")
    assert result["returncode"] == 3
    lines = result["output"].splitlines()
    assert lines[0] == str(node.workspace.resolve())
    assert "out" in lines and "err" in lines


def test_commands_do_not_see_the_node_secret(node: Node) -> None:
    result = node.ok(SH, command="env")
    assert "TOOLSERVER_NODE_SECRET" not in result["output"]
    assert "test-node-secret" not in result["output"]


def test_output_is_capped_to_its_tail(node: Node) -> None:
    result = node.ok(SH, command="seq 1 20000")
    assert len(result["output"]) < 4200
    assert "earlier output omitted" in result["output"]
    assert result["output"].rstrip().endswith("20000")


def test_timeout_moves_the_command_to_the_background(node: Node) -> None:
    response = node.run(SH, command="echo begin; sleep 1.5; echo done", timeout=0.5)
    assert response.status_code == 450
    body = response.json()
    shell_id = body["shell_id"]
    assert f"shell_id={shell_id}" in body["detail"]
    assert body["output"].strip() == "begin"
    final = node.ok(SH, shell_id=shell_id, timeout=5)
    assert final["status"] == "exited" and final["returncode"] == 0
    assert final["output"].strip() == "done"
    # fully read and finished: the id is released
    assert node.run(SH, shell_id=shell_id).status_code == 500


def test_run_async_then_read_then_kill(node: Node) -> None:
    started = node.ok(SH, command="echo ready; sleep 0.3; echo more; sleep 60", run_async=True)
    shell_id = started["shell_id"]
    assert started["status"] == "running" and started["output"].strip() == "ready"
    pgid = _group_of(shell_id, node)
    time.sleep(0.5)
    later = node.ok(SH, shell_id=shell_id)
    assert later["status"] == "running" and later["output"].strip() == "more"
    killed = node.ok(SH, shell_id=shell_id, kill=True)
    assert killed["status"] == "killed"
    assert not [p for p in psutil.process_iter() if _pgid(p) == pgid]


def test_async_shell_takes_input(node: Node) -> None:
    started = node.ok(SH, command="read name; echo hello $name", run_async=True)
    answer = node.ok(SH, shell_id=started["shell_id"], command="otter", timeout=5)
    assert answer["output"].strip() == "hello otter"
    assert answer["status"] == "exited"


def test_argument_mistakes_are_422(node: Node) -> None:
    assert node.run(SH, command="   ").status_code == 422
    assert node.run(SH, kill=True).status_code == 422
    assert node.run(SH, command="true", timeout=-1).status_code == 422
    assert node.run(SH, shell_id=99999).status_code == 500


def _pgid(proc: psutil.Process) -> int | None:
    try:
        import os

        return os.getpgid(proc.pid)
    except (ProcessLookupError, psutil.Error):
        return None


def _group_of(shell_id: int, node: Node) -> int:
    """The process group of the node's bash child running 'sleep 60'."""
    node_proc = psutil.Process(node.proc.pid)
    for child in node_proc.children(recursive=True):
        try:
            if child.name() == "bash" and "sleep 60" in " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    raise AssertionError(f"no bash child found for shell {shell_id}")
