"""The official SDK's clients, over Streamable HTTP and over ``toolserver mcp`` (stdio), against a
real manager and real nodes: a session's tools, faithful results, and cancellation."""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable

import anyio
import httpx
from mcp import Client, types

from tests.mcp.conftest import PNG_CELL, png_signature, session_nodes
from tests.support import ManagerProcess, sleeping, wait_until


def _text(result: types.CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, types.TextContent))


async def test_tools_are_the_nodes_tools(connect: Callable[[], Client], mcp_manager: ManagerProcess) -> None:
    async with connect() as client:
        (record,) = session_nodes(mcp_manager)  # initialize gave this session a node of its own
        tools = {t.name: t for t in (await client.list_tools()).tools}
        cookie = {"Cookie": f"node_id={record['id']}"}
        names = {"tool_names": sorted(tools)}
        async with httpx.AsyncClient(trust_env=False) as http:
            answer = await http.post(
                f"{mcp_manager.url}/get_json_schema_for_tools", json=names, headers=cookie
            )
        schemas = answer.json()["tools_json"]
        assert {s["name"] for s in schemas} == set(tools) >= {"shell_command_executor", "calculator"}
        for schema in schemas:  # what /get_json_schema_for_tools says, as MCP tools
            assert tools[schema["name"]].input_schema == schema["parameters"]
            assert tools[schema["name"]].description == schema["description"]


async def test_results_map_faithfully(connect: Callable[[], Client]) -> None:
    async with connect() as client:
        result = await client.call_tool("calculator", {"expression": "6*7"})
        assert (_text(result), result.is_error) == ("42", False)

        result = await client.call_tool("shell_command_executor", {"command": "echo hello; exit 3"})
        assert not result.is_error
        assert result.structured_content == {"returncode": 3, "output": "hello\n"}

        result = await client.call_tool("PythonNotebook_execute_cell", {"code": PNG_CELL})
        assert not result.is_error, _text(result)
        (image,) = [c for c in result.content if isinstance(c, types.ImageContent)]
        assert image.mime_type == "image/png" and png_signature(base64.b64decode(image.data))
        assert "plotted" in _text(result)

        # a tool error, with the node's message
        result = await client.call_tool("PythonNotebook_execute_cell", {"code": "1 / 0"})
        assert result.is_error and "ZeroDivisionError" in _text(result)

        # a bad argument names the field
        result = await client.call_tool("calculator", {"expresion": "6*7"})
        assert result.is_error
        assert "missing required argument 'expression'" in _text(result)
        assert "unexpected argument 'expresion'" in _text(result)

        result = await client.call_tool("no_such_tool", {})
        assert result.is_error and "no tool named 'no_such_tool'" in _text(result)

        # output not ready (450): says how to fetch it later; the job goes on in the background
        result = await client.call_tool("shell_command_executor", {"command": "sleep 30", "timeout": 0.3})
        assert not result.is_error
        shell_id = result.structured_content["shell_id"]
        assert f"shell_id={shell_id}" in _text(result) and "Output not ready" in _text(result)
        result = await client.call_tool("shell_command_executor", {"shell_id": shell_id, "kill": True})
        assert result.structured_content["status"] == "killed"


async def test_cancelled_call_kills_its_command(
    connect: Callable[[], Client], mcp_manager: ManagerProcess
) -> None:
    token = secrets.token_hex(4)
    seconds = f"{70 + secrets.randbelow(20)}.{secrets.randbelow(1000):03d}"
    command = f"sleep {seconds}; touch late-{token}"

    def running() -> list[object]:
        # machine-wide (no one else sleeps this long): a sandboxed node's cwd is its own /workspace
        return sleeping(seconds)

    async with connect() as client:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(client.call_tool, "shell_command_executor", {"command": command})
            await anyio.to_thread.run_sync(lambda: wait_until(running, timeout=30, what="the command runs"))
            tasks.cancel_scope.cancel()  # the SDK sends notifications/cancelled
        await anyio.to_thread.run_sync(
            lambda: wait_until(lambda: not running(), timeout=15, what="the cancelled command killed")
        )
        check = {"command": f"ls late-{token} || echo none"}
        result = await client.call_tool("shell_command_executor", check)
        assert "none" in result.structured_content["output"]  # the rest of the command never ran
