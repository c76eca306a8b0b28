"""The node checker keeps the records true: idle close, release, vanished nodes, orphans, its own record."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import requests

from tests.support import ManagerProcess, wait_until
from toolserver.client import ToolServerClient

FAST = {"health_check_interval": 0.1, "idling_close_minutes": 0.01, "idling_release_minutes": 0.02}


def test_idle_node_is_stopped_then_released(manager_factory: Callable[..., ManagerProcess]) -> None:
    manager = manager_factory(node=FAST)  # close after 0.6 s idle, release 1.2 s after stopping
    with ToolServerClient(manager.url) as client:
        session = client.get_cookie()
        started = time.monotonic()
        stopped_at = wait_until(
            lambda: manager.node(session.node_id)["status"] == "exited" and time.monotonic(),
            timeout=10,
            what="idle close",
        )
        assert stopped_at - started >= 0.5  # not before the idle time
        assert manager.node_processes() == []
        wait_until(lambda: manager.node(session.node_id) is None, timeout=10, what="release")
        assert time.monotonic() - stopped_at >= 1.0
        assert manager.node_dirs() == []


def test_requests_keep_a_node_alive(manager_factory: Callable[..., ManagerProcess]) -> None:
    manager = manager_factory(node={**FAST, "idling_close_minutes": 0.03})  # 1.8 s
    with ToolServerClient(manager.url) as client, client.session() as session:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            session.get_available_tools()
            time.sleep(0.3)
        assert manager.node(session.node_id)["status"] == "running"


def test_vanished_node_record_is_deleted_and_orphan_removed(
    manager_factory: Callable[..., ManagerProcess],
) -> None:
    # removes a node's process and directory by hand, as only the process tier lets one
    manager = manager_factory(isolation="process", node={"health_check_interval": 0.1})
    with ToolServerClient(manager.url) as client:
        gone = client.get_cookie()
        orphan = client.get_cookie()
        # a node whose runtime object was removed by hand: its record goes
        gone_dir = manager.data_dir / "nodes" / manager.node(gone.node_id)["short_id"]
        for proc in manager.node_processes():
            if str(gone_dir) in " ".join(proc.cmdline()):
                proc.kill()
        shutil.rmtree(gone_dir)
        wait_until(lambda: manager.node(gone.node_id) is None, timeout=5, what="record deleted")
        # a node whose record was deleted by hand: the runtime object goes
        orphan_short = manager.node(orphan.node_id)["short_id"]
        manager.query("DELETE FROM toolserver_nodes WHERE id = ?", orphan.node_id)
        con_rows = manager.nodes()
        assert all(r["id"] != orphan.node_id for r in con_rows)
        wait_until(
            lambda: not (manager.data_dir / "nodes" / orphan_short).exists(), timeout=5, what="orphan removed"
        )
        assert manager.node_processes() == []


def test_stale_checker_record_is_replaced(manager_factory: Callable[..., ManagerProcess]) -> None:
    manager = manager_factory()
    manager.stop()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    insert = (
        "INSERT INTO node_checkers (manager_id, pid, interval, host, heartbeat_at) VALUES (?, ?, 1.0, ?, ?)"
    )
    # this manager's record left by a process that died on this host
    manager.query(insert, manager.config["manager_id"], dead.pid, socket.gethostname(), "2026-01-01 00:00:00")
    # another host's checker that stopped beating long ago
    manager.query(insert, "elsewhere-8080", 1, "another-host", "2020-01-01 00:00:00")
    manager.start()
    rows = {r["manager_id"]: r for r in manager.query("SELECT * FROM node_checkers")}
    assert set(rows) == {manager.config["manager_id"]}
    assert rows[manager.config["manager_id"]]["pid"] == manager.proc.pid
    manager.stop()
    assert (
        manager.query("SELECT * FROM node_checkers WHERE manager_id = ?", manager.config["manager_id"]) == []
    )


def test_checker_loop_ends_when_its_record_is_deleted(manager_factory: Callable[..., ManagerProcess]) -> None:
    manager = manager_factory(builtin_monitor=False, node={"health_check_interval": 0.1})
    checker = subprocess.Popen(
        [sys.executable, "-m", "toolserver", "checker", "--config", str(manager.config_path)],
        cwd=manager.root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until(lambda: manager.query("SELECT pid FROM node_checkers"), timeout=20, what="registration")
        assert manager.query("SELECT pid FROM node_checkers")[0]["pid"] == checker.pid
        # the standalone checker does the checker's work: a killed node is seen
        with ToolServerClient(manager.url) as client, client.session() as session:
            [proc] = manager.node_processes()
            proc.send_signal(signal.SIGKILL)
            wait_until(lambda: manager.node(session.node_id)["status"] == "exited", timeout=5, what="exited")
        manager.query("DELETE FROM node_checkers")
        assert checker.wait(timeout=10) == 0
        # started again and stopped with SIGTERM, it deletes its own record
        checker = subprocess.Popen(
            [sys.executable, "-m", "toolserver", "checker", "--config", str(manager.config_path)],
            cwd=manager.root,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: manager.query("SELECT pid FROM node_checkers"), timeout=20, what="registration")
        checker.terminate()
        assert checker.wait(timeout=10) == 0
        assert manager.query("SELECT pid FROM node_checkers") == []
    finally:
        checker.kill()
        checker.wait()
    assert requests.get(manager.url + "/alive").status_code == 200


def test_a_standby_worker_takes_over_when_the_checking_one_dies(
    manager_factory: Callable[..., ManagerProcess],
) -> None:
    first = manager_factory(node={"health_check_interval": 0.2})
    second = manager_factory(start=False, node={"health_check_interval": 0.2})
    second.share_with(first).start()  # one manager id: the second worker stands by
    assert [r["pid"] for r in first.query("SELECT pid FROM node_checkers")] == [first.pid]
    with ToolServerClient(second.url) as client, client.session() as session:
        first.proc.kill()  # no shutdown: its NodeChecker record stays behind
        first.proc.wait()
        wait_until(
            lambda: [r["pid"] for r in second.query("SELECT pid FROM node_checkers")] == [second.pid],
            timeout=10,
            what="the standby worker registering",
        )
        # and it does the checker's work: a killed node is seen
        [proc] = second.node_processes()
        proc.send_signal(signal.SIGKILL)
        wait_until(lambda: second.node(session.node_id)["status"] == "exited", timeout=5, what="exited")
    second.stop()
    assert second.query("SELECT pid FROM node_checkers") == []
