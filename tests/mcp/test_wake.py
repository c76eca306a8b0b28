"""MCP tool calls wake their node: a node paused for idleness resumes, memory intact."""

from __future__ import annotations

from collections.abc import Callable

import anyio

from tests.mcp.conftest import mcp_client, session_nodes
from tests.support import ManagerProcess, wait_until


async def test_a_paused_node_resumes_for_the_next_tool_call(
    manager_factory: Callable[..., ManagerProcess],
) -> None:
    manager = manager_factory(
        node={"idling_close_minutes": 0.03, "idle_action": "pause", "health_check_interval": 0.2}
    )

    def paused() -> bool:
        return session_nodes(manager)[0]["status"] == "paused"

    async with mcp_client(manager, "http") as client:
        await client.call_tool("PythonNotebook_execute_cell", {"code": "v = 'kept in memory'"})
        await anyio.to_thread.run_sync(lambda: wait_until(paused, timeout=30, what="the idle node paused"))
        result = await client.call_tool("PythonNotebook_execute_cell", {"code": "print(v)"})
        assert not result.is_error and "kept in memory" in str(result.content), result
        assert session_nodes(manager)[0]["status"] == "running"
