"""Bad input gets a clear 4xx and the manager keeps serving."""

from __future__ import annotations

import socket

import httpx
import pytest
import requests

from tests.support import ManagerProcess
from toolserver.client import ToolServerClient
from toolserver.manager.proxy import session_cookie


def _alive(manager: ManagerProcess) -> None:
    assert requests.get(manager.url + "/alive", timeout=5).json() == "alive"


@pytest.mark.parametrize("cookie", [None, "", "garbage", "x" * 500, "../../etc/passwd", "' OR 1=1 --"])
def test_missing_or_malformed_cookie_on_a_node_path(manager: ManagerProcess, cookie: str | None) -> None:
    cookies = {"node_id": cookie} if cookie is not None else None
    r = requests.post(
        manager.url + "/execute_tool", json={"tool_name": "x", "arguments": {}}, cookies=cookies
    )
    assert r.status_code == 403
    assert r.json()["detail"].startswith("invalid node_id")
    _alive(manager)


def test_unknown_path_invalid_json_and_oversized_headers(manager: ManagerProcess) -> None:
    assert requests.post(manager.url + "/no/such/path").status_code == 404
    assert requests.get(manager.url + "/execute_tool").status_code == 405
    with ToolServerClient(manager.url) as client, client.session() as session:
        cookies = {"node_id": session.node_id}
        r = requests.post(
            manager.url + "/execute_tool",
            data=b"{not json",
            cookies=cookies,
            headers={"Content-Type": "application/json"},
        )
        assert 400 <= r.status_code < 500
        r = requests.post(manager.url + "/execute_tool", json={"arguments": {}}, cookies=cookies)
        assert r.status_code == 422 and "tool_name" in r.text
        # 100 KB of headers: refused by the HTTP layer with a 4xx, not a crash
        r = httpx.post(
            manager.url + "/execute_tool",
            headers={"X-Big": "a" * 100_000, "Cookie": f"node_id={session.node_id}"},
            trust_env=False,
        )
        assert 400 <= r.status_code < 500
        # a garbage request line
        with socket.create_connection(("127.0.0.1", manager.port), timeout=5) as sock:
            sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 400")
        assert session.get_available_tools()["available_tools"]
    _alive(manager)


def test_session_cookie_is_not_forwarded_to_the_node() -> None:
    assert session_cookie("node_id=secret-token; theme=dark") == ("secret-token", "theme=dark")
    assert session_cookie("theme=dark;node_id=tok") == ("tok", "theme=dark")
    assert session_cookie("node_id=secret-token") == ("secret-token", "")
    assert session_cookie("theme=dark") == (None, "theme=dark")
