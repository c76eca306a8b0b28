"""``/mcp`` behind API keys: a key opens a session of its own, which no other key can use."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client

from tests.mcp.conftest import assert_nothing_leaked, mcp_client, session_nodes
from tests.mcp.test_http import ACCEPT, INITIALIZE
from tests.support import ManagerProcess


def _key(manager: ManagerProcess, name: str, *extra: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOOLSERVER_")}
    argv = [sys.executable, "-m", "toolserver", "keys", "--config", str(manager.config_path), "create", name]
    done = subprocess.run([*argv, *extra], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@asynccontextmanager
async def _client(url: str, key: str) -> Any:
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=60) as http,
        Client(streamable_http_client(url, http_client=http)) as client,
    ):
        yield client


async def test_mcp_sessions_belong_to_their_key(manager_factory: Callable[..., ManagerProcess]) -> None:
    manager = manager_factory(auth="api_keys")
    alice, bob = _key(manager, "alice"), _key(manager, "bob", "--max-sessions", "1")
    url = manager.url + "/mcp"
    async with httpx.AsyncClient(timeout=60, trust_env=False) as http:
        refused = await http.post(url, json=INITIALIZE, headers=ACCEPT)
        assert refused.status_code == 401 and not session_nodes(manager)  # no key: no node

        async with _client(url, alice) as client:  # the SDK's client, with alice's key
            result = await client.call_tool("calculator", {"expression": "6*7"})
            assert result.content[0].text == "42"
            (record,) = session_nodes(manager)
            assert record["owner"] == alice.split("_")[1]  # the session is alice's

        def as_(key: str, sid: str | None = None) -> dict[str, str]:
            headers = {**ACCEPT, "Authorization": f"Bearer {key}", "mcp-protocol-version": "2025-11-25"}
            return {**headers, "mcp-session-id": sid} if sid else headers

        ping = {"jsonrpc": "2.0", "id": 9, "method": "ping"}
        sid = (await http.post(url, json=INITIALIZE, headers=as_(alice))).headers["mcp-session-id"]
        assert (await http.post(url, json=ping, headers=as_(alice, sid))).status_code == 200
        # bob, even holding alice's session id, does not get in
        assert (await http.post(url, json=ping, headers=as_(bob, sid))).status_code == 404
        assert (await http.delete(url, headers=as_(bob, sid))).status_code == 404
        assert len(session_nodes(manager)) == 1  # and cannot end it either
        await http.delete(url, headers=as_(alice, sid))

        # bob's quota (one live session) holds for MCP sessions too
        sid = (await http.post(url, json=INITIALIZE, headers=as_(bob))).headers["mcp-session-id"]
        with pytest.raises(BaseExceptionGroup) as over:
            async with _client(url, bob):
                pass
        assert over.group_contains(MCPError, match="max_sessions")
        await http.delete(url, headers=as_(bob, sid))

    # toolserver mcp carries its key to the manager
    async with mcp_client(manager, "stdio", "--api-key", alice) as client:
        assert (await client.call_tool("calculator", {"expression": "1+1"})).content[0].text == "2"
        assert [r["owner"] for r in session_nodes(manager)] == [alice.split("_")[1]]
    assert_nothing_leaked(manager)
