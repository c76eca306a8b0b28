"""``toolserver mcp`` on stdio: attaching to a session an HTTP client opened, and clear failures."""

from __future__ import annotations

import subprocess
import sys

from tests.mcp.conftest import mcp_client, session_nodes
from tests.support import ManagerProcess
from toolserver.client import AsyncToolServerClient


async def test_attach_shares_a_session_and_leaves_it_running(mcp_manager: ManagerProcess) -> None:
    async with AsyncToolServerClient(mcp_manager.url) as http:
        session = await http.get_cookie()  # an XAgent-style session
        try:
            await session.execute_tool(
                "FileSystemEnv_write_to_file", {"filepath": "shared.txt", "content": "from xagent"}
            )
            async with mcp_client(mcp_manager, "stdio", "--session", session.node_id) as client:
                (contents,) = (await client.read_resource("workspace:///shared.txt")).contents
                assert contents.text.strip() == "from xagent"  # the tool ends the file with a newline
                await client.call_tool("shell_command_executor", {"command": "echo from mcp > reply.txt"})
            # the attached session outlives the stdio server, with what it wrote
            assert [r["id"] for r in session_nodes(mcp_manager)] == [session.node_id]
            reply = await session.execute_tool("FileSystemEnv_read_from_file", {"filepath": "reply.txt"})
            assert "from mcp" in str(reply)
        finally:
            await session.release()


def test_unknown_session_or_manager_fails_clearly(mcp_manager: ManagerProcess) -> None:
    argv = [sys.executable, "-m", "toolserver", "mcp", "--url", mcp_manager.url, "--session", "nope"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 1 and done.stdout == ""
    assert "cannot get session nope" in done.stderr and "invalid node_id" in done.stderr
    assert "Traceback" not in done.stderr

    dead = "http://127.0.0.1:9"  # discard port: nothing listens
    done = subprocess.run(
        [sys.executable, "-m", "toolserver", "mcp", "--url", dead], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1 and f"cannot get a new session from {dead}" in done.stderr
    assert "Traceback" not in done.stderr
