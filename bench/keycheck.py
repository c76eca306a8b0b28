"""Benchmark: what the API key check costs a request, measured in process.

The manager checks a request's key once, in the ASGI layer in front of the routes and the proxy:
:func:`toolserver.manager.auth.credentials` finds the key among the request's headers and
:meth:`~toolserver.manager.auth.KeyRing.verify` answers from its cache (a key is read from the
database and hashed once per ``key_cache_seconds``). The figure is that step's cost per request,
for a request with six headers and a cached user key, on a real :class:`KeyRing` over a real
SQLite store (rounds of 10,000 checks, the median round). The same-run reference is the uncached
path: one SHA-256 of the key plus the database read of its record.

The proxy benchmark's end-to-end figure (a worker with ``auth: api_keys`` against one with
``auth: none``) carries this cost too, but between two processes on two shared cores its run to
run spread is larger than the check itself; this figure isolates it.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from bench.common import Context, Figure, Outcome, at_most
from toolserver.manager.auth import KeyRing, credentials, hash_key, new_key
from toolserver.manager.models import ApiKey, utcnow
from toolserver.manager.settings import load_settings
from toolserver.manager.store import open_store

NAME = "keycheck"
TITLE = "API key check, in process"
TARGET_MS = 0.1


def _rounds(check: Any, rounds: int, per_round: int) -> list[float]:
    """Milliseconds per call of ``check`` (a coroutine function) in each of ``rounds`` rounds."""

    async def run() -> list[float]:
        out = []
        for _ in range(rounds):
            started = time.perf_counter()
            for _ in range(per_round):
                await check()
            out.append((time.perf_counter() - started) / per_round * 1e3)
        return out

    return asyncio.run(run())


def run(ctx: Context) -> Outcome:
    outcome = Outcome(NAME, TITLE, method=__doc__ or "")
    data = ctx.workdir / "keycheck"
    data.mkdir(parents=True, exist_ok=True)
    settings = load_settings(None, auth="api_keys", data_dir=str(data))
    key_id, token = new_key()

    async def prepare() -> Any:
        store = await open_store(f"sqlite+aiosqlite:///{data}/keys.sqlite")
        key = ApiKey(id=key_id, name="bench", scope="user", secret_hash=hash_key(token), created_at=utcnow())
        await store.add_key(key)
        return store

    store = asyncio.run(prepare())
    headers = [
        (b"host", b"127.0.0.1:8080"),
        (b"user-agent", b"bench"),
        (b"cookie", b"node_id=" + b"x" * 43),
        (b"content-type", b"application/json"),
        (b"content-length", b"59"),
        (b"authorization", f"Bearer {token}".encode()),
    ]
    ring = KeyRing(store, settings)

    async def cached() -> None:
        await ring.verify(credentials(headers))

    async def uncached() -> None:
        ring._cache.clear()  # what the first request after key_cache_seconds pays
        await ring.verify(credentials(headers))

    rounds, per_round = ctx.pick(20, 5), ctx.pick(10_000, 2_000)
    warm = statistics.median(_rounds(cached, rounds, per_round))
    cold = statistics.median(_rounds(uncached, ctx.pick(5, 2), ctx.pick(200, 50)))
    outcome.raw.update(cached_ms=warm, uncached_ms=cold)
    outcome.add(
        Figure(
            NAME,
            "key check per request, cached key (credentials + KeyRing.verify), p50 of rounds",
            warm,
            "ms",
            f"uncached check (SHA-256 + database read) {cold:.3f} ms",
            f"≤ {TARGET_MS} ms",
            at_most(warm, TARGET_MS),
        )
    )
    return outcome
