"""An MCP session's node under the manager's rules: node.max_nodes, the checker's idle close, and
the session's own idle end (mcp.session_idle_minutes); answers as server-sent events, which also
carry a shell command's output as progress."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import anyio
import httpx
import pytest
from mcp import Client, MCPError

from tests.mcp.conftest import assert_nothing_leaked, mcp_client, session_nodes
from tests.mcp.test_http import ACCEPT, INITIALIZE
from tests.support import ManagerProcess, wait_until

IDLE_CLOSE_MINUTES = 0.05  # the checker stops a node after 3 s without requests
SESSION_IDLE_MINUTES = 0.1  # an MCP session without requests ends after 6 s


@pytest.fixture(scope="module")
def strict_manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagerProcess]:
    manager = ManagerProcess(
        tmp_path_factory.mktemp("mcp-lifecycle") / "manager",
        node={"max_nodes": 1, "idling_close_minutes": IDLE_CLOSE_MINUTES},
        # server-sent events here: the other modules run the JSON default
        mcp={"session_idle_minutes": SESSION_IDLE_MINUTES, "json_response": False},
    )
    manager.start()
    try:
        yield manager
    finally:
        assert not manager.cleanup()


async def _in_thread(what: str, predicate: Callable[[], object]) -> object:
    return await anyio.to_thread.run_sync(lambda: wait_until(predicate, timeout=30, what=what))


async def test_capacity_applies_to_mcp_sessions(strict_manager: ManagerProcess) -> None:
    async with Client(strict_manager.url + "/mcp"):
        # node.max_nodes = 1: a second session is refused with the manager's reason
        with pytest.raises(BaseExceptionGroup) as refused:
            async with Client(strict_manager.url + "/mcp"):
                pass
        assert refused.group_contains(MCPError, match=r"node\.max_nodes = 1")
    await anyio.to_thread.run_sync(assert_nothing_leaked, strict_manager)


@pytest.mark.parametrize("transport", ["http", "stdio"])
async def test_idle_closed_node_starts_again_for_the_next_call(
    strict_manager: ManagerProcess, transport: str
) -> None:
    def stopped() -> bool:
        return session_nodes(strict_manager)[0]["status"] == "exited"

    async with mcp_client(strict_manager, transport) as client:
        kept = {"filepath": "kept.txt", "content": "still here"}
        await client.call_tool("FileSystemEnv_write_to_file", kept)
        # the checker stops the idle node like any session's; the next call starts it again
        await _in_thread("the idle node stopped", stopped)
        result = await client.call_tool("FileSystemEnv_read_from_file", {"filepath": "kept.txt"})
        assert not result.is_error and "still here" in result.content[0].text
        assert session_nodes(strict_manager)[0]["status"] == "running"
        # and so does a resource read
        await _in_thread("the idle node stopped again", stopped)
        (contents,) = (await client.read_resource("workspace:///kept.txt")).contents
        assert contents.text.strip() == "still here"
    await anyio.to_thread.run_sync(assert_nothing_leaked, strict_manager)


async def test_idle_session_ends_and_releases_its_node(strict_manager: ManagerProcess) -> None:
    url = strict_manager.url + "/mcp"
    async with httpx.AsyncClient(timeout=60, trust_env=False) as http:
        opened = await http.post(url, json=INITIALIZE, headers=ACCEPT)  # then nothing: no DELETE
        sid = opened.headers["mcp-session-id"]
        assert len(session_nodes(strict_manager)) == 1
        await _in_thread("the idle session's node released", lambda: not session_nodes(strict_manager))
        ping = {"jsonrpc": "2.0", "id": 5, "method": "ping"}
        late = await http.post(url, json=ping, headers={**ACCEPT, "mcp-session-id": sid})
        assert late.status_code == 404  # the SDK's session ended too
    await anyio.to_thread.run_sync(assert_nothing_leaked, strict_manager)


@pytest.mark.parametrize("transport", ["http", "stdio"])
async def test_shell_output_comes_as_progress(strict_manager: ManagerProcess, transport: str) -> None:
    seen: list[tuple[float, str]] = []

    async def progress(done: float, total: float | None, message: str | None) -> None:
        seen.append((done, message or ""))

    command = "for i in 1 2 3; do echo line$i; sleep 0.4; done; echo done >&2"
    async with mcp_client(strict_manager, transport) as client:
        result = await client.call_tool(
            "shell_command_executor", {"command": command}, progress_callback=progress
        )
    # the result is the tool's own ...
    assert result.structured_content == {"returncode": 0, "output": "line1\nline2\nline3\ndone\n"}
    # ... and the output came while it was printed, in order, with a growing count (the last chunk
    # may come after the result, which has it all, and is then not reported)
    words = "".join(m for _, m in seen).split()
    assert len(seen) >= 2 and words[:2] == ["line1", "line2"], seen
    assert words == ["line1", "line2", "line3", "done"][: len(words)]
    assert [d for d, _ in seen] == sorted({d for d, _ in seen})
    await anyio.to_thread.run_sync(assert_nothing_leaked, strict_manager)
