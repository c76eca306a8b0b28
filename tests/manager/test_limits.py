"""Request limits enforced by the manager's server: header bytes and count, request line, slow and
silent clients, bodies of the session routes; the memory an over-limit client can make it hold."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import psutil
import pytest
import requests

from tests.support import ManagerProcess

#: Not the defaults, so that the test shows the settings reach the server.
LIMITS = {
    "header_bytes": 12 * 1024,
    "headers": 50,
    "request_line_bytes": 4096,
    "body_bytes": 32 * 1024,
    "head_timeout_seconds": 1.0,
    "idle_timeout_seconds": 1.0,
}


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagerProcess]:
    manager = ManagerProcess(tmp_path_factory.mktemp("limits") / "manager", limits=LIMITS)
    manager.start()
    try:
        yield manager
    finally:
        assert not manager.cleanup()


def _connect(manager: ManagerProcess, timeout: float = 10) -> socket.socket:
    return socket.create_connection(("127.0.0.1", manager.port), timeout=timeout)


def _answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def test_heads_over_the_limits_are_refused_and_the_manager_serves_on(manager: ManagerProcess) -> None:
    # exactly one byte more than limits.header_bytes, never finished
    prefix = b"POST /get_cookie HTTP/1.1\r\nHost: x\r\nX-Big: "
    with _connect(manager) as sock:
        sock.sendall(prefix + b"a" * (12 * 1024 + 1 - len(prefix)))
        answer = _answer(sock)
    assert _status(answer) == 431 and b"larger than 12288 bytes" in answer
    # many small header fields
    with _connect(manager) as sock:
        fields = b"".join(b"X-%d: v\r\n" % i for i in range(51))
        sock.sendall(b"GET /alive HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
        answer = _answer(sock)
    assert _status(answer) == 431 and b"more than 50 header fields" in answer
    # a long request line
    with _connect(manager) as sock:
        sock.sendall(b"GET /alive?" + b"q" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = _answer(sock)
    assert _status(answer) == 414 and b"longer than 4096 bytes" in answer
    # a complete head just over the limit (parsed in one read) is refused as well
    big = requests.get(manager.url + "/alive", headers={"X-Big": "b" * 13_000}, timeout=10)
    assert big.status_code == 431
    assert requests.get(manager.url + "/alive", headers={"X-Fine": "c" * 8_000}, timeout=10).json() == "alive"
    assert manager.nodes() == []


def test_bodies_of_the_session_routes_are_bounded(manager: ManagerProcess) -> None:
    body = b'{"labels": {"a": "' + b"x" * 100_000 + b'"}}'
    answer = requests.post(
        manager.url + "/get_cookie", data=body, headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == 413 and "limits.body_bytes" in answer.json()["detail"]
    chunked = requests.post(manager.url + "/release_session", data=iter([b"y" * 40_000] * 3))
    assert chunked.status_code == 413
    assert manager.nodes() == []


def test_slow_and_silent_clients_are_cut_off(manager: ManagerProcess) -> None:
    started = time.monotonic()
    with _connect(manager) as silent:  # connects and sends nothing
        answer = _answer(silent)
    assert _status(answer) == 408 and 0.8 < time.monotonic() - started < 5

    started = time.monotonic()
    with _connect(manager) as slowloris:  # a head trickling in, a byte at a time
        slowloris.sendall(b"GET /alive HTTP/1.1\r\n")
        with pytest.raises(OSError):
            for _ in range(50):
                slowloris.sendall(b"X")
                time.sleep(0.1)
        answer = _answer(slowloris)
    assert _status(answer) == 408 and b"not received within 1 s" in answer
    assert time.monotonic() - started < 5

    with _connect(manager) as stalled:  # promises a body, sends part of it, stops
        stalled.sendall(b'POST /get_cookie HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"labels"')
        answer = _answer(stalled)
    assert _status(answer) == 408 and b"no request body data for 1 s" in answer
    assert requests.get(manager.url + "/alive", timeout=10).json() == "alive"
    assert manager.nodes() == []


def test_three_clients_sending_32_mib_of_headers_cost_the_manager_a_few_mib(manager: ManagerProcess) -> None:
    proc = psutil.Process(manager.pid)
    for _ in range(20):  # warm up: allocations a first request makes
        requests.get(manager.url + "/alive", headers={"X-Warm": "w" * 11_000}, timeout=10)
    before = proc.memory_info().rss
    chunk = b"a" * (1 << 16)
    sent = [0, 0, 0]
    peak = [before]
    done = threading.Event()

    def client(i: int) -> None:
        with _connect(manager, timeout=30) as sock:
            try:
                sock.sendall(b"GET /alive HTTP/1.1\r\nHost: x\r\nX-Huge: ")
                while sent[i] < 32 << 20:
                    sock.sendall(chunk)
                    sent[i] += len(chunk)
                done.wait(30)  # an unfinished request, held open
            except OSError:
                pass  # refused and closed: what should happen

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.01)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    watcher = threading.Thread(target=watch)
    for t in [*threads, watcher]:
        t.start()
    time.sleep(3)  # long enough for 3 x 32 MiB over loopback where nothing stops them
    peak[0] = max(peak[0], proc.memory_info().rss)
    done.set()
    for t in [*threads, watcher]:
        t.join(30)
    grown = (peak[0] - before) / (1 << 20)
    assert grown < 4, f"the manager grew by {grown:.1f} MiB"
    assert all(s < 32 << 20 for s in sent), sent  # each connection was cut off early
    assert requests.get(manager.url + "/alive", timeout=10).json() == "alive"
