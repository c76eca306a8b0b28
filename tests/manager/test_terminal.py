"""The terminal through the manager: ``toolserver shell`` driven in tmux, WebSocket forwarding and its
refusals, and ``toolserver run`` streaming a command's output."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.support import ManagerProcess, Tmux, sleeping, terminal_transcript, until_async, wait_until
from toolserver.client import Session, ToolServerClient

ENV = {k: v for k, v in os.environ.items() if not k.startswith("TOOLSERVER_")}


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagerProcess]:
    started = ManagerProcess(tmp_path_factory.mktemp("terminal")).start()
    yield started
    leftovers = started.cleanup()
    assert not leftovers, f"processes left running: {leftovers}"


@pytest.fixture(scope="module")
def session(manager: ManagerProcess) -> Iterator[Session]:
    with ToolServerClient(manager.url) as client, client.create_session() as s:
        yield s


def test_toolserver_shell_in_tmux(manager: ManagerProcess, session: Session) -> None:
    shell = f"{sys.executable} -m toolserver shell --url {manager.url} {session.session_id}"
    with Tmux(f"{shell}; echo EXIT=$?", cols=100, rows=30) as tmux:
        wait_until(lambda: tmux.screen().strip(), what="the remote prompt")
        tmux.keys("stty size; echo $((6*7))-done", "Enter")
        tmux.wait_for("42-done")
        assert "30 100" in tmux.screen()
        tmux.resize(80, 20)
        tmux.keys("clear; stty size", "Enter")
        tmux.wait_for("20 80")
        tmux.keys("cd sub 2>/dev/null || mkdir sub && cd sub; pwd", "Enter")
        tmux.wait_for("/workspace/sub")
        tmux.keys("sleep 4950", "Enter")
        wait_until(lambda: sleeping("4950"), what="the sleep")
        tmux.keys("C-c")  # raw mode: Ctrl-C goes to the remote foreground job
        wait_until(lambda: not sleeping("4950"), what="Ctrl-C to end the sleep")
        tmux.keys("echo $((50+5))-ready; (exit 5)", "Enter")
        # the prompt is back, so the shell reads again: a Ctrl-D typed while the command still
        # ran would reach no reader and be lost
        wait_until(
            lambda: "55-ready" in (screen := tmux.screen()) and screen.rstrip().endswith(("#", "$")),
            what="the prompt after the command",
        )
        tmux.keys("C-d")  # Ctrl-D on an empty line ends the remote shell, and the local command
        tmux.wait_for("EXIT=5")  # with the status of the shell's last command, as bash does
    assert session.files.exists("sub")


def test_toolserver_shell_refuses_an_unknown_session(manager: ManagerProcess, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "toolserver", "shell", "--url", manager.url, "no-such-session"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
        stdin=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    assert done.returncode == 1
    assert done.stderr == "toolserver: 403 invalid node_id: no-such-session\n"


async def test_websocket_forwarding(manager: ManagerProcess, session: Session) -> None:
    url = manager.url.replace("http", "ws") + "/terminal?cols=90&rows=20"
    cookie = {"Cookie": f"node_id={session.session_id}"}
    async with aiohttp.ClientSession() as http:
        for headers, status in (
            ({}, 403),
            ({"Cookie": "node_id=nonsense"}, 403),
            ({**cookie, "Origin": "http://evil.example"}, 403),
        ):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(url, headers=headers)
            assert refused.value.status == status, headers
        # same-origin (a page the manager served) and non-browser clients get through
        same_origin = {**cookie, "Origin": manager.url}
        async with http.ws_connect(url, headers=same_origin) as ws:
            text, exit_message = await terminal_transcript(ws, b"stty size; exit 3\r")
            assert "20 90" in text and exit_message == {"type": "exit", "exit_code": 3}
            assert ws.close_code == 1000  # the node closed: the manager closed the client's side
        # the client closing ends the shell on the node
        async with http.ws_connect(url, headers=cookie) as ws:
            await ws.send_bytes(b"sleep 4951\r")
            await until_async(lambda: sleeping("4951"), what="the sleep")
        await until_async(lambda: not sleeping("4951"), 10, "the shell to end with its client")


def test_toolserver_run_streams_and_exits_with_the_commands_status(
    manager: ManagerProcess, session: Session
) -> None:
    argv = [sys.executable, "-m", "toolserver", "run", "--url", manager.url, "--session", session.session_id]
    script = "echo out; echo err >&2; exit 7"
    done = subprocess.run([*argv, script], capture_output=True, text=True, env=ENV, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (7, "out\n", "err\n")
    # output reaches the terminal while the command still runs
    proc = subprocess.Popen([*argv, "echo first; sleep 30"], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "first\n"
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(10)
