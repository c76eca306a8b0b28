"""Benchmark 7: what three clients sending 32 MiB of request headers cost the manager.

Three client threads each open a connection, send a request line and start one header whose
value never ends, writing 64 KiB at a time until 32 MiB are sent or the server closes the
connection; they hold the connection open until the end of the measurement. The manager's peak
RSS growth (psutil, sampled every 10 ms from before the first byte until 3 s after) is the
figure. The same-run reference is a plain uvicorn server with its stock httptools protocol
(what the manager ran before ``limits``), loaded the same way: httptools keeps a header's bytes
until the header ends, so there the growth follows what the clients send.
"""

from __future__ import annotations

import socket
import sys
import textwrap
import threading
import time
from pathlib import Path

from bench.common import MIB, Context, Figure, Outcome, at_most
from bench.procs import Manager, end, spawn
from bench.rss import PeakRss
from toolserver.testing import free_port, http_ok, wait_until

NAME = "limits"
TITLE = "Request limits: 3 clients x 32 MiB of headers"
CLIENTS = 3
TOTAL = 32 * MIB
CHUNK = 64 * 1024
TARGET_MIB = 5.0

PLAIN = textwrap.dedent(
    """
    import sys, uvicorn

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), http="httptools", log_level="warning")
    """
)


def _client(port: int, sent: list[int], index: int, hold: threading.Event) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"GET /alive HTTP/1.1\r\nHost: bench\r\nX-Huge: ")
            chunk = b"a" * CHUNK
            while sent[index] < TOTAL:
                sock.sendall(chunk)
                sent[index] += CHUNK
            hold.wait(30)
    except OSError:
        pass  # the server refused and closed the connection


def load(port: int, pid: int) -> tuple[float, list[int]]:
    """Peak RSS growth (MiB) of ``pid`` while three clients send 32 MiB headers to ``port``."""
    sent = [0] * CLIENTS
    hold = threading.Event()
    with PeakRss(pid, interval=0.01) as peak:
        threads = [threading.Thread(target=_client, args=(port, sent, i, hold)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        time.sleep(3)
        hold.set()
        for t in threads:
            t.join(30)
    return (peak.peak - peak.baseline) / MIB, sent


def run(ctx: Context) -> Outcome:
    outcome = Outcome(NAME, TITLE, method=__doc__ or "")
    root = ctx.workdir / "limits"
    with Manager(root / "manager") as manager:
        for _ in range(20):  # warm up
            http_ok(manager.url + "/alive")
        grown, sent = load(manager.port, manager.pid)
    root.mkdir(parents=True, exist_ok=True)
    script = Path(root / "plain.py")
    script.write_text(PLAIN)
    port = free_port()
    plain = spawn([sys.executable, str(script), str(port)], root / "plain.log")
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/"), timeout=30, what="plain uvicorn")
        reference, reference_sent = load(port, plain.pid)
    finally:
        end(plain)
    outcome.raw = {
        "manager_mib": grown,
        "sent": sent,
        "reference_mib": reference,
        "reference_sent": reference_sent,
    }
    outcome.add(
        Figure(
            NAME,
            "manager RSS growth, 3 clients sending 32 MiB headers",
            grown,
            "MiB",
            f"stock uvicorn + httptools: +{reference:.0f} MiB",
            f"≤ {TARGET_MIB:g} MiB",
            at_most(grown, TARGET_MIB),
            note=f"clients wrote at most {max(sent) / MIB:.1f} MiB before the manager closed",
        )
    )
    return outcome
