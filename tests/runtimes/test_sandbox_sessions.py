"""The ``sandbox`` tier through the manager: what an agent holding one session of two can and cannot
do. The isolation tests also run on the ``process`` tier, where they must fail (strict xfail): that
tier confines nothing, and the suite says so rather than hiding it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import httpx
import psutil
import pytest

from tests.support import ManagerProcess, wait_until
from toolserver.client import Session, ToolServerClient
from toolserver.testing.tiers import PROCESS, SANDBOX, Tier

LIMITS = {"memory": "200m", "pids_limit": 64, "cpus": 1.0}
ISOLATION_TIERS = [
    SANDBOX.param(),
    pytest.param(
        PROCESS, id="process", marks=pytest.mark.xfail(strict=True, reason="process nodes are not isolated")
    ),
]


def _manager(root: Path, tier: Tier, **runtime_config: object) -> ManagerProcess:
    config = tier.manager_config()
    if tier.name == "sandbox":
        config["runtime_config"] = {"workspace_size": "32m", **runtime_config}
    return ManagerProcess(root, node={"resources": LIMITS}, **config).start()


@pytest.fixture(scope="module", params=ISOLATION_TIERS)
def manager(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ManagerProcess]:
    started = _manager(tmp_path_factory.mktemp("sbx"), request.param)
    yield started
    started.cleanup()


@pytest.fixture(scope="module")
def sessions(manager: ManagerProcess) -> Iterator[tuple[Session, Session]]:
    with ToolServerClient(manager.url) as client, client.create_session() as a, client.create_session() as b:
        a.files.write("mine.txt", "a's file")
        b.files.write("theirs.txt", "b's secret file")
        yield a, b


def _sh(session: Session, command: str) -> tuple[int, str]:
    result = session.run(command, timeout=60)
    return result.exit_code, result.stdout + result.stderr


def _record(manager: ManagerProcess, session: Session) -> dict[str, object]:
    row = manager.node(session.session_id)
    assert row is not None
    return dict(row)


def test_no_read_of_the_host_or_another_session(
    manager: ManagerProcess, sessions: tuple[Session, Session]
) -> None:
    a, b = sessions
    other = _record(manager, b)
    other_dir = json.loads(str(other["runtime_state"]))["dir"]
    targets = [
        str(manager.db_path),
        str(manager.config_path),
        f"{other_dir}/secret",
        f"{other_dir}/workspace/theirs.txt",
        f"{other_dir}/disk/workspace/theirs.txt",
        "/etc/shadow",
        "/root/.bashrc",
        "/root/.pyenv/version",
    ]
    for target in targets:
        code, out = _sh(a, f"cat {target}")
        assert code != 0, f"the node read {target}: {out[:200]}"
        assert "b's secret file" not in out and "SQLite" not in out
    code, out = _sh(a, f"ls {manager.data_dir} {Path(other_dir).parent}")
    assert code != 0, f"the node lists the data directory: {out[:300]}"


def test_ps_shows_only_its_own_processes(manager: ManagerProcess, sessions: tuple[Session, Session]) -> None:
    a, _ = sessions
    code, out = _sh(a, "ps -eo pid,args")
    assert code == 0, out
    assert "toolserver manager" not in out, out
    assert _sh(a, f"kill -0 {manager.pid}")[0] != 0, "the node can signal the manager"
    nodes = [line for line in out.splitlines() if "-m toolserver node" in line and "bwrap" not in line]
    assert len(nodes) == 1, f"the node sees other nodes: {out}"
    assert str(manager.data_dir) not in out, f"the node sees where the data directory is: {out}"


def test_runs_as_an_unprivileged_host_uid(manager: ManagerProcess, sessions: tuple[Session, Session]) -> None:
    a, b = sessions
    uids = []
    for session in (a, b):
        _sh(session, "sleep 0.1")
        state = json.loads(str(_record(manager, session)["runtime_state"]))
        workspace_owner = None
        for proc in psutil.Process(state["pid"]).children(recursive=True):
            if "node" in proc.cmdline() and "toolserver" in " ".join(proc.cmdline()):
                workspace_owner = proc.uids().real
        assert workspace_owner not in (None, 0), f"the node runs as host uid {workspace_owner}"
        uids.append(workspace_owner)
    assert uids[0] != uids[1], f"two nodes share the host uid {uids[0]}"


def test_cannot_reach_the_manager_port(manager: ManagerProcess, sessions: tuple[Session, Session]) -> None:
    a, _ = sessions
    probe = (
        "import socket; s = socket.socket(); s.settimeout(3); "
        f"print('CONNECTED' if s.connect_ex(('127.0.0.1', {manager.port})) == 0 else 'refused')"
    )
    _, out = _sh(a, f'python -c "{probe}"')
    assert "CONNECTED" not in out, "the node reached the manager's port"


# ---- sandbox only: limits and routing ------------------------------------------------------------------


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagerProcess]:
    if SANDBOX.unavailable():
        pytest.skip(f"tier sandbox: {SANDBOX.unavailable()}")
    started = _manager(tmp_path_factory.mktemp("sbx-limits"), SANDBOX)
    yield started
    started.cleanup()


def _detail(manager: ManagerProcess, session: Session) -> str:
    return str(_record(manager, session)["detail"] or "")


def test_memory_hog_is_contained_and_reported(sandbox: ManagerProcess) -> None:
    with (
        ToolServerClient(sandbox.url) as client,
        client.create_session() as hog,
        client.create_session() as other,
    ):
        code, out = _sh(hog, "python -c \"x = bytearray(600 * 1024 * 1024); print('survived')\"")
        assert "survived" not in out and code != 0, out
        assert client.alive() and _sh(other, "echo still-here") == (0, "still-here\n")
        wait_until(lambda: "OOMKilled" in _detail(sandbox, hog), timeout=10, what="OOMKilled in the record")
        assert _sh(hog, "echo back")[1] == "back\n"  # the node itself lives on


def test_fork_bomb_is_contained_and_reported(sandbox: ManagerProcess) -> None:
    with (
        ToolServerClient(sandbox.url) as client,
        client.create_session() as bomb,
        client.create_session() as other,
    ):
        result = bomb.run("for i in $(seq 200); do sleep 30 & done; wait", timeout=5)
        assert "fork" in (result.stdout + result.stderr) or result.exit_code != 0
        assert client.alive() and _sh(other, "echo still-here") == (0, "still-here\n")
        wait_until(
            lambda: "pids limit" in _detail(sandbox, bomb), timeout=10, what="the pids limit in the record"
        )
        bomb.run("pkill sleep; true", timeout=30)


def test_disk_filler_stops_at_the_limit(sandbox: ManagerProcess) -> None:
    with ToolServerClient(sandbox.url) as client, client.create_session() as filler:
        _, out = _sh(filler, "dd if=/dev/zero of=big bs=1M count=100 2>&1; ls -l big")
        assert "No space left" in out, out
        size = filler.files.list(".")
        assert all(f.size < 40 * 1024 * 1024 for f in size), size
        assert client.alive()
        filler.files.remove("big")
        assert _sh(filler, "echo ok > small && cat small") == (0, "ok\n")


def test_unix_socket_routing_for_tools_streams_and_terminal(sandbox: ManagerProcess) -> None:
    import asyncio

    with ToolServerClient(sandbox.url) as client, client.create_session() as s:
        record = _record(sandbox, s)
        assert str(record["ip"]).startswith("unix:") and record["port"] == 0, record
        assert s.execute_tool("calculator", {"expression": "6*7"}) is not None
        chunks: list[str] = []
        result = s.run("for i in 1 2 3; do echo line$i; done", on_stdout=chunks.append)
        assert result.exit_code == 0 and "".join(chunks) == "line1\nline2\nline3\n"

        async def terminal() -> str:
            url = sandbox.url.replace("http", "ws") + "/terminal?cols=80&rows=24"
            seen = b""
            async with (
                aiohttp.ClientSession() as http,
                http.ws_connect(url, headers={"Cookie": f"node_id={s.session_id}"}) as ws,
            ):
                await ws.send_bytes(b"echo $((6*7))-from-terminal; exit\n")
                async for message in ws:
                    if message.type == aiohttp.WSMsgType.BINARY:
                        seen += message.data
            return seen.decode(errors="replace")

        assert "42-from-terminal" in asyncio.run(terminal())
        assert httpx.get(sandbox.url + "/alive", trust_env=False).status_code == 200


def test_an_upload_into_a_full_workspace_is_refused_with_507(sandbox: ManagerProcess, tmp_path: Path) -> None:
    """A 48 MiB upload into a 32 MiB workspace: 507 saying the workspace is full (it was a 500),
    nothing half-written is kept, and the session goes on."""
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * (48 << 20))
    with ToolServerClient(sandbox.url) as client, client.create_session() as s:
        cookie = {"Cookie": f"node_id={s.session_id}"}
        with big.open("rb") as f:
            r = httpx.post(
                sandbox.url + "/upload_file", files={"file": ("big.bin", f)}, headers=cookie, timeout=120
            )
        assert r.status_code == 507, r.text
        assert "workspace is full" in r.json()["detail"] and "nothing was kept" in r.json()["detail"]
        left = [f.name for f in s.files.list(".")]
        assert left == [], f"left in the workspace: {left}"
        s.files.write("small.txt", "still works")
        assert s.files.read("small.txt").strip() == b"still works"
