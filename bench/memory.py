"""Benchmark 5: manager memory per tracked session, at 1,000 sessions.

A real manager subprocess (process runtime, ``builtin_monitor: false`` so no checker deletes the
records below) starts one real session and node. Then:

1. warm-up: 300 proxied requests (``execute_tool`` of the calculator) with the real cookie;
2. reference: the same number of requests as there will be sessions, all with the real cookie:
   the RSS growth from serving that many requests without tracking anything new;
3. 1,000 session records are inserted into the manager's SQLite database (one transaction), each
   with its own cookie and short id, ``running``/``healthy``, pointing at the one real node (its
   address and secret), so every one of them proxies for real;
4. each of the 1,000 cookies is used once through the proxy: the manager reads the record, keeps
   a route in its route cache and an entry in its activity buffer (flushed to the records every
   second).

RSS (psutil, the median of 5 samples 50 ms apart) is read after each step; the activity buffer is
given 1.5 s to flush before a reading, except the one right after step 4, taken at once so that
buffer entries not yet flushed count. Memory per session = (growth over steps 3-4, the higher of
the two readings, minus the reference growth of step 2) / 1,000. It covers everything the manager
keeps per session: route cache entry, activity buffer entry, and SQLite page cache for the records.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import statistics
import time
from typing import Any

import httpx

from bench.common import Context, Figure, Outcome, at_most
from bench.procs import Manager
from bench.rss import rss

NAME = "memory"
TITLE = "Manager memory per tracked session"
TARGET_BYTES = 10 * 1024
SMALL_TOOL = {"tool_name": "calculator", "arguments": {"expression": "6*7"}}
CONCURRENCY = 8


def steady_rss(pid: int, samples: int = 5) -> int:
    values = []
    for _ in range(samples):
        values.append(rss(pid))
        time.sleep(0.05)
    return int(statistics.median(values))


async def _hit(url: str, cookies: list[str]) -> int:
    """One proxied execute_tool per cookie in ``cookies`` (CONCURRENCY at a time); returns non-200s."""
    failures = 0
    queue: asyncio.Queue[str] = asyncio.Queue()
    for cookie in cookies:
        queue.put_nowait(cookie)

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal failures
        while not queue.empty():
            cookie = queue.get_nowait()
            resp = await http.post("/execute_tool", json=SMALL_TOOL, headers={"Cookie": f"node_id={cookie}"})
            failures += resp.status_code != 200

    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=60) as http:
        await asyncio.gather(*(worker(http) for _ in range(CONCURRENCY)))
    return failures


def hit(url: str, cookies: list[str]) -> None:
    failures = asyncio.run(_hit(url, cookies))
    if failures:
        raise RuntimeError(f"{failures} of {len(cookies)} proxied requests failed")


def insert_sessions(manager: Manager, template: dict[str, Any], count: int) -> list[str]:
    """``count`` running records copied from ``template`` with fresh ids; returns their cookies."""
    cookies = [secrets.token_urlsafe(32) for _ in range(count)]
    columns = [c for c in template if c not in ("id", "short_id")]
    sql = (
        f"INSERT INTO toolserver_nodes (id, short_id, {', '.join(columns)}) "
        f"VALUES (?, ?, {', '.join('?' for _ in columns)})"
    )
    rows = []
    for cookie in cookies:
        values = [json.dumps({}) if c == "runtime_state" else template[c] for c in columns]
        rows.append([cookie, secrets.token_hex(6), *values])
    import sqlite3

    con = sqlite3.connect(manager.db_path, timeout=30)
    try:
        with con:
            con.executemany(sql, rows)
    finally:
        con.close()
    return cookies


def run(ctx: Context) -> Outcome:
    outcome = Outcome(NAME, TITLE, method=__doc__ or "")
    count = 1000
    root = ctx.workdir / "memory"
    with Manager(root / "manager", builtin_monitor=False) as manager:
        with httpx.Client(base_url=manager.url, trust_env=False, timeout=120) as http:
            cookie = http.post("/get_cookie").cookies["node_id"]
        template = dict(manager.node(cookie))
        hit(manager.url, [cookie] * 300)
        time.sleep(1.5)
        r0 = steady_rss(manager.pid)
        hit(manager.url, [cookie] * count)
        time.sleep(1.5)
        r1 = steady_rss(manager.pid)
        cookies = insert_sessions(manager, template, count)
        r2 = steady_rss(manager.pid)
        hit(manager.url, cookies)
        r3 = steady_rss(manager.pid)
        time.sleep(1.5)
        r4 = steady_rss(manager.pid)
        tracked = len(manager.query("SELECT id FROM toolserver_nodes"))
    reference = r1 - r0
    growth = max(r3, r4) - r2
    per_session = (growth - reference) / count
    outcome.raw = {
        "sessions": count,
        "records_in_db": tracked,
        "rss": {"warm": r0, "after_reference": r1, "after_insert": r2, "after_touch": r3, "after_flush": r4},
        "reference_growth_bytes": reference,
        "growth_bytes": growth,
        "per_session_bytes": per_session,
    }
    outcome.add(
        Figure(
            NAME,
            f"manager memory per tracked session ({count:,} sessions)",
            per_session / 1024,
            "KiB",
            f"{count:,} requests on one session grew RSS by {reference / 1024:.0f} KiB",
            "≤ 10 KB",
            at_most(per_session, TARGET_BYTES),
            note=f"RSS +{growth / 1024:.0f} KiB for {count:,} sessions",
        )
    )
    return outcome
