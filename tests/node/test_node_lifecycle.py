"""Node process lifecycle: shutdown without orphans, registered tools across restarts, config handling."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import requests

from .conftest import SECRET, Node, free_port

TOOL_CODE = '''
def triple(value: int) -> int:
    """Multiply a number by three.

    Args:
        value: the number to multiply
    """
    return value * 3
'''


def test_sigterm_stops_kernel_and_background_shells_without_orphans(make_node) -> None:  # type: ignore[no-untyped-def]
    node = make_node()
    node.ok("PythonNotebook_execute_cell", code="import subprocess\np = subprocess.Popen(['sleep', '300'])")
    node.ok("shell_command_executor", command="sleep 300 & sleep 301", run_async=True)
    children = psutil.Process(node.proc.pid).children(recursive=True)
    assert len(children) >= 4  # kernel, its sleep, bash, two sleeps
    started = time.monotonic()
    node.proc.send_signal(signal.SIGTERM)
    assert node.proc.wait(5) == 0
    assert time.monotonic() - started < 3
    _, alive = psutil.wait_procs(children, timeout=2)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive


def test_registered_tools_survive_a_restart(make_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    state = tmp_path / "custom-state"
    workspace = tmp_path / "ws"
    config = {"allow_register_tool": True}
    node = make_node(config, workspace=workspace, env={"TOOLSERVER_NODE_STATE_DIR": str(state)})
    response = node.post("/register_new_tool", json={"tool_name": "triple", "code": TOOL_CODE})
    assert response.status_code == 200, response.text
    schema = response.json()
    assert schema["name"] == "triple"
    assert schema["parameters"]["properties"]["value"]["description"] == "the number to multiply"
    assert node.ok("triple", value=5) == 15
    assert (state / "tools" / "triple.py").is_file()
    assert not list(workspace.iterdir())  # state stays out of the workspace

    again = node.post("/register_new_tool", json={"tool_name": "triple", "code": TOOL_CODE})
    assert again.status_code == 400 and "already exists" in again.json()["detail"]
    node.stop()

    restarted = make_node(config, workspace=workspace, env={"TOOLSERVER_NODE_STATE_DIR": str(state)})
    assert "triple" in restarted.post("/get_available_tools").json()["available_tools"]
    assert restarted.ok("triple", value=7) == 21


def test_register_refuses_bad_code(node: Node) -> None:
    cases = [
        ("broken_syntax", "def broken_syntax(:\n  pass", "does not compile"),
        ("raises_on_load", "raise ValueError('nope at import')", "nope at import"),
        ("not_defined", "def other():\n    return 1", "must define a function named 'not_defined'"),
        ("bad name!", "def x(): pass", "invalid tool name"),
        ("calculator", "def calculator(): return 1", "already exists"),
        ("star_args", "def star_args(*values): return values", "plain or keyword-only"),
    ]
    for name, code, message in cases:
        response = node.post("/register_new_tool", json={"tool_name": name, "code": code})
        assert response.status_code == 400, (name, response.text)
        assert message in response.json()["detail"], (name, response.text)


def test_register_is_off_by_default(make_node) -> None:  # type: ignore[no-untyped-def]
    node = make_node()
    response = node.post("/register_new_tool", json={"tool_name": "triple", "code": TOOL_CODE})
    assert response.status_code == 403
    assert "allow_register_tool" in response.json()["detail"]


def test_without_a_secret_no_header_is_needed(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TOOLSERVER_NODE_SECRET"}
    node = Node(tmp_path / "ws", None, tmp_path, env=None)
    node.env = env
    node.start()
    try:
        assert requests.post(f"{node.url}/get_available_tools", timeout=5).status_code == 200
    finally:
        node.stop()


def test_unknown_config_key_stops_the_node_with_a_message(tmp_path: Path) -> None:
    config = tmp_path / "bad.yml"
    config.write_text("allow_register_tools: true\n")
    command = [sys.executable, "-m", "toolserver", "node", "--port", str(free_port())]
    command += ["--workspace", str(tmp_path / "w"), "--config", str(config)]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "TOOLSERVER_NODE_SECRET": SECRET},
    )
    assert result.returncode == 2
    assert "allow_register_tools" in result.stderr


def test_environment_overrides_the_config_file(make_node) -> None:  # type: ignore[no-untyped-def]
    config = {"max_output_chars": 50_000, "request_max_bytes": 2048}
    node = make_node(config, env={"TOOLSERVER_NODE_MAX_OUTPUT_CHARS": "1000"})
    output = node.ok("shell_command_executor", command="seq 1 5000")["output"]
    assert len(output) < 1100
    too_big = node.post(
        "/execute_tool", json={"tool_name": "calculator", "arguments": {"expression": "1" * 3000}}
    )
    assert too_big.status_code == 413


def test_embedding_retrieval_when_configured(make_node, web_url: str) -> None:  # type: ignore[no-untyped-def]
    node = make_node({"embedding_url": f"{web_url}/embeddings"})
    body = node.post("/retrieving_tools", json={"question": "calculator calculator", "top_k": 2}).json()
    assert body["retrieved_tools"][0] == "calculator"
    broken = make_node({"embedding_url": "http://127.0.0.1:9/embeddings"})  # falls back to BM25
    body = broken.post("/retrieving_tools", json={"question": "arithmetic expression", "top_k": 1}).json()
    assert body["retrieved_tools"] == ["calculator"]


def test_every_tool_call_has_an_overall_time_limit(make_node) -> None:  # type: ignore[no-untyped-def]
    node = make_node({"tool_timeout": 1})
    started = time.monotonic()
    response = node.run("shell_command_executor", command="sleep 30", timeout=20)
    assert response.status_code == 450
    assert "did not finish within 1 s" in response.json()["detail"]
    assert time.monotonic() - started < 3
    # the command was stopped with the call
    time.sleep(0.2)
    assert not [c for c in psutil.Process(node.proc.pid).children(recursive=True) if "sleep" in c.name()]
    assert node.ok("calculator", expression="1+1") == 2
