"""Manager shutdown: stop (default) stops the nodes; keep leaves them running for the next manager."""

from __future__ import annotations

from collections.abc import Callable

from tests.support import ManagerProcess
from toolserver.client import ToolServerClient

WRITE = "FileSystemEnv_write_to_file"
READ = "FileSystemEnv_read_from_file"


def test_restart_with_keep_still_routes_the_session(manager_factory: Callable[..., ManagerProcess]) -> None:
    manager = manager_factory(node={"on_shutdown": "keep"})
    with ToolServerClient(manager.url) as client:
        session = client.get_cookie()
        session.execute_tool(WRITE, {"filepath": "kept.txt", "content": "still here"})
        [before] = manager.node_processes()
        assert manager.stop()
        assert [p.pid for p in manager.node_processes()] == [before.pid]  # the node kept running
        manager.start()
        assert "still here" in str(session.execute_tool(READ, {"filepath": "kept.txt"}))
        assert manager.node(session.node_id)["status"] == "running"
        session.reconnect()  # the new manager can drive the node it did not start
        assert "still here" in str(session.execute_tool(READ, {"filepath": "kept.txt"}))
        session.release()
    assert manager.node_processes() == []
    assert manager.nodes() == []


def test_shutdown_with_stop_stops_nodes_and_keeps_records(
    manager_factory: Callable[..., ManagerProcess],
) -> None:
    manager = manager_factory()
    with ToolServerClient(manager.url) as client:
        session = client.get_cookie()
        session.execute_tool(WRITE, {"filepath": "a.txt", "content": "before restart"})
        assert manager.stop()
        assert manager.node_processes() == []
        assert manager.node(session.node_id)["status"] == "exited"
        manager.start()
        session.reconnect()
        assert "before restart" in str(session.execute_tool(READ, {"filepath": "a.txt"}))
        session.release()
