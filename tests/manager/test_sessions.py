"""The whole session lifecycle through a real manager, real node processes and a real SQLite file."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import requests

from tests.support import ManagerProcess, marked_processes, wait_until
from toolserver.client import AsyncToolServerClient, ToolServerClient
from toolserver.errors import ClientError

WRITE = "FileSystemEnv_write_to_file"
READ = "FileSystemEnv_read_from_file"


def test_lifecycle_through_the_client(manager: ManagerProcess, tmp_path: Path) -> None:
    with ToolServerClient(manager.url) as client:
        assert client.alive()
        with client.session() as session:
            record = manager.node(session.node_id)
            assert record is not None and record["status"] == "running" and record["health"] == "healthy"
            tools = session.get_available_tools()
            assert WRITE in tools["available_tools"]

            session.execute_tool(WRITE, {"filepath": "notes/hello.txt", "content": "hello\nworld\n"})
            assert "world" in str(session.execute_tool(READ, {"filepath": "notes/hello.txt"}))

            src = tmp_path / "data.bin"
            src.write_bytes(os.urandom(300_000))
            session.upload_file(src)
            dest = session.download_file("data.bin", tmp_path / "back.bin")
            assert dest.read_bytes() == src.read_bytes()

            session.reconnect()  # restart: the workspace survives
            assert "world" in str(session.execute_tool(READ, {"filepath": "notes/hello.txt"}))

            session.close()
            assert manager.node(session.node_id)["status"] == "exited"
            with pytest.raises(ClientError) as err:
                session.execute_tool(READ, {"filepath": "notes/hello.txt"})
            assert err.value.status_code == 503 and "not running" in str(err.value)
            assert manager.node_processes() == []

            session.reconnect()  # a closed session comes back
            assert "world" in str(session.execute_tool(READ, {"filepath": "notes/hello.txt"}))
        # leaving the context released the session: no record, no process, no directory
        assert manager.node(session.node_id) is None
        assert manager.node_processes() == []
        assert manager.node_dirs() == []
        with pytest.raises(ClientError) as err:
            session.execute_tool(READ, {"filepath": "x"})
        assert err.value.status_code == 403


async def test_lifecycle_through_the_async_client(manager: ManagerProcess) -> None:
    async with AsyncToolServerClient(manager.url) as client, client.session() as session:
        await session.execute_tool(WRITE, {"filepath": "a.txt", "content": "async works"})
        assert "async works" in str(await session.execute_tool(READ, {"filepath": "a.txt"}))
        with pytest.raises(ClientError) as err:
            await session.execute_tool("no_such_tool", {})
        assert err.value.status_code == 404
    assert manager.nodes() == []


def test_xagent_style_requests(manager: ManagerProcess, tmp_path: Path) -> None:
    """The calls exactly as XAgent's toolserver_interface.py makes them."""
    url = manager.url
    response = requests.post(f"{url}/get_cookie")
    assert response.status_code == 200
    # XAgent's two keys as they were; the session's id and expiry besides (issue 11)
    body = response.json()
    assert {k: body[k] for k in ("message", "version")} == {
        "message": "add cookie",
        "version": manager.config.get("version", "0.1.0"),
    }
    assert set(body) == {"message", "version", "session_id", "expires_at"}
    assert response.headers["Server"].startswith("ToolServerManager/")
    cookies = response.cookies
    node_id = cookies["node_id"]
    assert len(node_id) >= 22  # >= 128 random bits, url-safe base64
    record = manager.node(node_id)
    assert record is not None
    assert node_id != str(record["runtime_state"])
    assert not record["port"] or str(record["port"]) not in node_id  # port 0: a Unix-socket node

    tools = requests.post(f"{url}/get_available_tools", json={}, timeout=10, cookies=cookies).json()
    assert {"available_envs", "available_tools", "tools_json"} <= set(tools)

    payload = {"tool_name": WRITE, "arguments": {"filepath": "x.txt", "content": "42"}}
    r = requests.post(f"{url}/execute_tool", json=payload, cookies=cookies)
    assert r.status_code == 200
    r = requests.post(
        f"{url}/execute_tool", json={"tool_name": "hallucinated_tool", "arguments": {}}, cookies=cookies
    )
    assert r.status_code == 404

    local = tmp_path / "upload.txt"
    local.write_text("uploaded by xagent")
    with local.open("rb") as fh:
        r = requests.post(
            f"{url}/upload_file",
            timeout=10,
            cookies=cookies,
            files={"file": fh, "filename": os.path.basename(local)},
        )
    r.raise_for_status()
    r = requests.post(f"{url}/download_file", json={"file_path": "upload.txt"}, timeout=10, cookies=cookies)
    r.raise_for_status()
    assert r.content == b"uploaded by xagent"
    r = requests.post(f"{url}/get_workspace_structure", timeout=10, cookies=cookies)
    r.raise_for_status()
    assert "upload.txt" in r.text
    r = requests.post(f"{url}/download_workspace", cookies=cookies)
    r.raise_for_status()
    assert r.content[:2] == b"PK"

    assert requests.post(f"{url}/close_session", cookies=cookies).status_code == 200
    assert requests.post(f"{url}/release_session", cookies=cookies).status_code == 200
    assert manager.nodes() == []


@pytest.mark.parametrize("path", ["/reconnect_session", "/close_session", "/release_session"])
def test_unknown_or_missing_node_id(manager: ManagerProcess, path: str) -> None:
    r = requests.post(manager.url + path)
    assert r.status_code == 403 and r.json() == "invalid node_id: None"
    r = requests.post(manager.url + path, cookies={"node_id": "not-a-session"})
    assert r.status_code == 403 and r.json() == "invalid node_id: not-a-session"
    assert requests.get(manager.url + "/alive").json() == "alive"


def test_node_killed_is_seen_and_answers_503(manager_factory: Callable[..., ManagerProcess]) -> None:
    manager = manager_factory(isolation="process")  # kills the node's process, counts marked ones
    with ToolServerClient(manager.url) as client, client.session() as session:
        record = manager.node(session.node_id)
        session.execute_tool("shell_command_executor", {"command": "sleep 300", "run_async": True})
        assert len(marked_processes(record["short_id"])) >= 2  # the node and its background shell
        [proc] = manager.node_processes()
        os.kill(proc.pid, signal.SIGKILL)
        # the checker ticks every 0.2 s: two ticks and a little
        wait_until(
            lambda: manager.node(session.node_id)["status"] == "exited",
            timeout=0.2 * 2 + 1.0,
            what="status exited",
        )
        with pytest.raises(ClientError) as err:
            session.execute_tool(READ, {"filepath": "x"})
        assert err.value.status_code == 503
        assert "signal 9" in (manager.node(session.node_id)["detail"] or "")
        assert record["port"] != 0
        session.reconnect()
        assert manager.node(session.node_id)["status"] == "running"
        # the shell that outlived its node was killed when the node was restarted
        [node] = marked_processes(record["short_id"])
        assert node.pid == manager.node_processes()[0].pid


def test_node_port_is_useless_without_the_secret(manager_factory: Callable[..., ManagerProcess]) -> None:
    manager = manager_factory(isolation="process")  # a TCP port (sandbox nodes: a root-only socket)
    with ToolServerClient(manager.url) as client, client.session() as session:
        record = manager.node(session.node_id)
        direct = httpx.post(
            f"http://127.0.0.1:{record['port']}/execute_tool",
            trust_env=False,
            json={"tool_name": READ, "arguments": {"filepath": "x"}},
        )
        assert direct.status_code == 401
        assert httpx.get(f"http://127.0.0.1:{record['port']}/health", trust_env=False).status_code == 200


def test_last_req_time_follows_requests_in_batches(manager: ManagerProcess) -> None:
    with ToolServerClient(manager.url) as client, client.session() as session:
        first = manager.node(session.node_id)["last_req_time"]
        time.sleep(0.05)
        for _ in range(20):
            session.get_available_tools()
        # buffered in memory, written within about a second
        wait_until(
            lambda: manager.node(session.node_id)["last_req_time"] > first,
            timeout=3,
            what="last_req_time written",
        )
