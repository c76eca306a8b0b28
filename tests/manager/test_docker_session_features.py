"""Streamed commands, the terminal, the notebook's plots and the SDK's files in a Docker node, through
the manager: the same features as on the process tier, inside the hardened container."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import aiohttp
import pytest

from tests.support import (
    ManagerProcess,
    Tmux,
    docker_containers,
    docker_unavailable_reason,
    remove_docker_networks,
    terminal_transcript,
    wait_until,
)
from toolserver.client import Session, ToolServerClient
from toolserver.runtimes.base import LABEL_MANAGER
from toolserver.testing.tiers import DOCKER

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagerProcess]:
    reason = docker_unavailable_reason()
    if reason:
        pytest.skip(reason)
    started = ManagerProcess(tmp_path_factory.mktemp("docker-features"), **DOCKER.manager_config()).start()
    label = f"{LABEL_MANAGER}={started.manager_id}"
    yield started
    started.stop()
    left = docker_containers(label)
    for row in left:
        subprocess.run(["docker", "rm", "-f", "-v", row["id"]], capture_output=True, timeout=60)
    remove_docker_networks(label)
    assert left == [], "containers left behind"


@pytest.fixture(scope="module")
def session(manager: ManagerProcess) -> Iterator[Session]:
    with ToolServerClient(manager.url) as client, client.create_session() as s:
        yield s


def test_streamed_commands_in_a_container(session: Session) -> None:
    seen: list[str] = []

    def on_stdout(text: str) -> None:
        seen.append(text)
        if "ready" in text:  # the command waits for this input: its output came while it ran
            (running,) = [c for c in session.commands.list() if c.status == "running"]
            session.commands.connect(running.id).send_stdin("go\n")

    result = session.run("id -u; echo ready; read x; echo $x >&2; exit 2", on_stdout=on_stdout, stdin=True)
    assert result.stdout.splitlines()[0] != "0"  # not root
    assert seen[-1].endswith("ready\n") and result.stderr == "go\n" and result.exit_code == 2
    handle = session.run("sleep 300", background=True)
    assert handle.kill().status == "killed"


def test_a_plot_in_a_container(session: Session) -> None:
    result = session.python(
        "import numpy as np, pandas as pd, matplotlib.pyplot as plt\n"
        "pd.DataFrame({'y': np.arange(5) ** 2}).plot()\nprint(pd.__name__)"
    )
    assert result.error is None and "pandas" in result.text, result
    assert result.images[0].media_type == "image/png" and result.images[0].data.startswith(b"\x89PNG")
    session.files.write("data/x.txt", "in the volume")
    assert [f.name for f in session.files.list("data")] == ["x.txt"]


async def test_the_terminal_in_a_container(manager: ManagerProcess, session: Session) -> None:
    url = manager.url.replace("http", "ws") + "/terminal?cols=70&rows=15"
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(url, headers={"Cookie": f"node_id={session.session_id}"}) as ws,
    ):
        text, control = await terminal_transcript(ws, b"stty size; pwd; exit\r")
    assert "15 70" in text and "/workspace" in text and control == {"type": "exit", "exit_code": 0}


def test_toolserver_shell_into_a_container(manager: ManagerProcess, session: Session) -> None:
    with Tmux(
        f"{sys.executable} -m toolserver shell --url {manager.url} {session.session_id}; echo EXIT=$?"
    ) as tmux:
        wait_until(lambda: tmux.screen().strip(), what="the remote prompt")
        tmux.keys("cat /proc/1/cgroup >/dev/null; whoami", "Enter")
        tmux.wait_for("toolserver")
        tmux.keys("exit 9", "Enter")
        tmux.wait_for("EXIT=9")
