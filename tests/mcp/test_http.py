"""What only ``/mcp`` on the manager does: sessions apart, the session id is not a cookie, the warm pool."""

from __future__ import annotations

import json

import anyio
import httpx
from mcp import Client
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS

from tests.mcp.conftest import assert_nothing_leaked, mcp_client, session_nodes
from tests.support import ManagerProcess, wait_until

INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "raw-test", "version": "0"},
    },
}
ACCEPT = {"Accept": "application/json, text/event-stream"}


def rpc_answer(resp: httpx.Response) -> dict:
    """The JSON-RPC message of an answer: a JSON body, or the last event of a server-sent stream."""
    if resp.headers["content-type"].startswith("application/json"):
        return resp.json()
    data = [line[5:].strip() for line in resp.text.splitlines() if line.startswith("data:")]
    return json.loads(data[-1])


async def test_concurrent_sessions_are_isolated(mcp_manager: ManagerProcess) -> None:
    both_live, looked = anyio.Event(), anyio.Event()
    live: list[str] = []

    async def one(name: str, seen: dict[str, set[str]]) -> None:
        async with mcp_client(mcp_manager, "http") as client:
            # the stateless probe was refused, so the client fell back to initialize
            assert client.protocol_version in HANDSHAKE_PROTOCOL_VERSIONS
            await client.call_tool(
                "FileSystemEnv_write_to_file", {"filepath": f"{name}.txt", "content": name}
            )
            live.append(name)
            if len(live) == 2:
                both_live.set()
            await both_live.wait()  # both sessions live at once
            files = {r.name for r in (await client.list_resources()).resources}
            # the workspace's identity (device and inode): sandboxed nodes all call theirs /workspace
            where = await client.call_tool("shell_command_executor", {"command": "stat -c %d:%i ."})
            seen[name] = files | {where.structured_content["output"].strip()}
            await looked.wait()  # the session stays open until its record has been looked at

    seen: dict[str, set[str]] = {}
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(one, "alpha", seen)
        tasks.start_soon(one, "beta", seen)
        with anyio.fail_after(60):
            await both_live.wait()

        def held_by_sessions() -> bool:
            # both nodes belong to their MCP sessions (handed over), so the checker never takes them
            # for creates that outlived their deadline
            return sum(n["ownership"] == "session" for n in session_nodes(mcp_manager)) == 2

        await anyio.to_thread.run_sync(
            lambda: wait_until(held_by_sessions, timeout=30, what="two handed-over session nodes")
        )
        looked.set()
    assert "alpha.txt" in seen["alpha"] and "beta.txt" not in seen["alpha"]
    assert "beta.txt" in seen["beta"] and "alpha.txt" not in seen["beta"]
    assert not seen["alpha"] & seen["beta"]  # not even the workspace directory is shared
    await anyio.to_thread.run_sync(assert_nothing_leaked, mcp_manager)


def test_session_id_and_cookie_never_mix(mcp_manager: ManagerProcess) -> None:
    url = mcp_manager.url + "/mcp"
    with httpx.Client(timeout=60, trust_env=False) as http:
        opened = http.post(url, json=INITIALIZE, headers=ACCEPT)
        assert opened.status_code == 200, opened.text
        sid = opened.headers["mcp-session-id"]
        (record,) = session_nodes(mcp_manager)
        cookie = record["id"]
        assert sid != cookie
        session = {**ACCEPT, "mcp-session-id": sid, "mcp-protocol-version": "2025-11-25"}
        http.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=session)
        call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call"}
        call["params"] = {"name": "calculator", "arguments": {"expression": "2+3"}}
        answer = rpc_answer(http.post(url, json=call, headers=session))
        assert answer["result"]["content"][0]["text"] == "5"

        # the session id is no cookie ...
        tool = {"tool_name": "calculator", "arguments": {"expression": "1"}}
        as_cookie = {"Cookie": f"node_id={sid}"}
        refused = http.post(mcp_manager.url + "/execute_tool", json=tool, headers=as_cookie)
        assert refused.status_code == 403 and "invalid node_id" in refused.text
        # ... and the cookie is no session id
        wrong = {**session, "mcp-session-id": cookie}
        assert http.post(url, json=call, headers=wrong).status_code == 404
        # a stateless (2026-07-28) request is told to open a session instead
        stateless = http.post(url, json=call, headers={**ACCEPT, "mcp-protocol-version": "2026-07-28"})
        error = stateless.json()["error"]
        assert stateless.status_code == 400 and error["code"] == -32022
        assert "2025-11-25" in error["data"]["supported"]

        assert http.delete(url, headers=session).status_code == 200
    assert_nothing_leaked(mcp_manager)


async def test_initialize_claims_a_warm_node(mcp_manager: ManagerProcess) -> None:
    def pooled() -> list[str]:
        rows = mcp_manager.query("SELECT id FROM toolserver_nodes WHERE pooled AND health = 'healthy'")
        return [r["id"] for r in rows]

    (warm,) = await anyio.to_thread.run_sync(lambda: wait_until(pooled, timeout=30, what="a warm node"))
    async with Client(mcp_manager.url + "/mcp") as client:
        (record,) = session_nodes(mcp_manager)
        assert record["id"] == warm
        await client.call_tool("calculator", {"expression": "1"})
    await anyio.to_thread.run_sync(assert_nothing_leaked, mcp_manager)


async def test_cancelled_cell_is_interrupted(mcp_manager: ManagerProcess) -> None:
    async with Client(mcp_manager.url + "/mcp") as client:
        await client.call_tool("PythonNotebook_execute_cell", {"code": "kept = 41"})
        with anyio.move_on_after(2.0):  # the cell would sleep for 5 minutes
            await client.call_tool("PythonNotebook_execute_cell", {"code": "import time; time.sleep(300)"})
        with anyio.fail_after(30):  # not queued behind the sleeping cell: it was interrupted
            result = await client.call_tool("PythonNotebook_execute_cell", {"code": "print(kept + 1)"})
        assert "42\n" in [c.text for c in result.content]  # and the kernel kept its variables
    await anyio.to_thread.run_sync(assert_nothing_leaked, mcp_manager)
