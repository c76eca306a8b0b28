"""A small HTTP/1.1 load generator, run as its own process so its CPU is not the server's.

``python -m bench.loadgen`` reads a JSON spec on stdin and prints a JSON result on stdout::

    {"host": "127.0.0.1", "port": 8080, "request": "<raw HTTP/1.1 request>",
     "concurrency": 64, "requests": 5000, "duration": 8.0, "warmup": 100}

``concurrency`` keep-alive connections each send the same request in a closed loop (next request
when the answer is complete). ``warmup`` requests are sent first and not recorded; then the
timed phase stops after ``requests`` answers or ``duration`` seconds, whichever comes first.
Responses are parsed with httptools (the parser uvicorn uses); the event loop is uvloop when it
is installed. Latency is the time from writing a request to the end of its response.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httptools

MAX_RECONNECTS = 100


def build_request(
    method: str, path: str, host: str, port: int, body: bytes = b"", headers: dict[str, str] | None = None
) -> bytes:
    """A raw keep-alive HTTP/1.1 request."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "User-Agent: toolserver-bench"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class Shared:
    deadline: float
    budget: int
    latencies_ns: list[int] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    reconnects: int = 0
    warmed: int = 0


class _Conn(asyncio.Protocol):
    """One keep-alive connection; ``roundtrip()`` sends the request and waits for its response."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.done: asyncio.Future[int] | None = None
        self.keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionResetError("connection closed"))

    def _fail(self, exc: BaseException) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(exc)

    # httptools callback
    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        if self.done is not None and not self.done.done():
            self.done.set_result(self.parser.get_status_code())

    async def roundtrip(self, request: bytes) -> int:
        assert self.transport is not None
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self.done

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def _connect(host: str, port: int) -> _Conn:
    _, conn = await asyncio.get_running_loop().create_connection(_Conn, host, port)
    return conn


async def _worker(spec: dict[str, Any], shared: Shared, warmup: int, started: asyncio.Event) -> None:
    host, port, request = spec["host"], int(spec["port"]), spec["request"].encode("latin-1")
    conn = await _connect(host, port)
    try:
        for _ in range(warmup):
            await conn.roundtrip(request)
        shared.warmed += 1
        await started.wait()
        while shared.budget > 0 and time.monotonic() < shared.deadline:
            shared.budget -= 1
            t0 = time.perf_counter_ns()
            try:
                status = await conn.roundtrip(request)
            except (OSError, httptools.HttpParserError):
                shared.errors += 1
                shared.reconnects += 1
                conn.close()
                if shared.reconnects > MAX_RECONNECTS:
                    raise
                conn = await _connect(host, port)
                continue
            shared.latencies_ns.append(time.perf_counter_ns() - t0)
            shared.statuses[status] = shared.statuses.get(status, 0) + 1
            if status >= 400:
                shared.errors += 1
            if not conn.keep_alive:
                conn.close()
                conn = await _connect(host, port)
    finally:
        conn.close()


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    concurrency = int(spec.get("concurrency", 1))
    warmup = -(-int(spec.get("warmup", 0)) // concurrency)  # per connection, rounded up
    duration = float(spec.get("duration", 10.0))
    shared = Shared(deadline=0.0, budget=int(spec.get("requests", 1000)))
    started = asyncio.Event()
    workers = [asyncio.create_task(_worker(spec, shared, warmup, started)) for _ in range(concurrency)]
    # the timed phase opens once every connection finished its warm-up (or failed)
    limit = time.monotonic() + duration + 60.0
    while shared.warmed < sum(1 for w in workers if not w.done()) and time.monotonic() < limit:
        await asyncio.sleep(0.005)
    t0 = time.perf_counter()
    shared.deadline = time.monotonic() + duration
    started.set()
    results = await asyncio.gather(*workers, return_exceptions=True)
    elapsed = time.perf_counter() - t0
    failures = [repr(r) for r in results if isinstance(r, BaseException)]
    completed = len(shared.latencies_ns)
    return {
        "completed": completed,
        "elapsed": elapsed,
        "rps": completed / elapsed if elapsed > 0 else 0.0,
        "errors": shared.errors,
        "statuses": {str(k): v for k, v in sorted(shared.statuses.items())},
        "worker_failures": failures[:5],
        "latencies_us": [round(ns / 1000, 1) for ns in shared.latencies_ns],
    }


def run_in_subprocess(spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run the generator as a separate process (``python -m bench.loadgen``); return its result."""
    limit = timeout if timeout is not None else float(spec.get("duration", 10.0)) + 120.0
    done = subprocess.run(
        [sys.executable, "-m", "bench.loadgen"],
        input=json.dumps(spec).encode(),
        capture_output=True,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=limit,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed ({done.returncode}): {done.stderr.decode()[-2000:]}")
    return json.loads(done.stdout)


def compare(specs: dict[str, dict[str, Any]], rounds: int) -> dict[str, dict[str, Any]]:
    """Load each target of ``specs`` in turn, ``rounds`` times in alternating order, and pool them.

    Returns ``{target: {"latency_ms": summary, "rps": [...], "rps_mean", "errors"}}``.
    """
    from bench.common import summary

    cells: dict[str, dict[str, Any]] = {t: {"latencies_us": [], "rps": [], "errors": 0} for t in specs}
    targets = tuple(specs)
    for rnd in range(rounds):
        for target in targets if rnd % 2 == 0 else tuple(reversed(targets)):
            res = run_in_subprocess(specs[target])
            if res["worker_failures"]:
                raise RuntimeError(f"{target}: load generator failures {res['worker_failures']}")
            cells[target]["latencies_us"] += res["latencies_us"]
            cells[target]["rps"].append(res["rps"])
            cells[target]["errors"] += res["errors"]
    for cell in cells.values():
        lat = cell.pop("latencies_us")
        cell["latency_ms"] = {k: v / 1000 if k != "count" else v for k, v in summary(lat).items()}
        cell["rps_mean"] = sum(cell["rps"]) / len(cell["rps"])
    return cells


def main() -> int:
    spec = json.load(sys.stdin)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvicorn[standard] brings uvloop
        runner = asyncio.run
    result = runner(run(spec))
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
