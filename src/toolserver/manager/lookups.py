"""Concurrent cache misses for one key share a single lookup (the first caller's)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import TypeVar

T = TypeVar("T")


async def shared_lookup(
    pending: dict[Hashable, asyncio.Future[T]], key: Hashable, load: Callable[[], Awaitable[T]]
) -> T:
    """``await load()``, unless a lookup of ``key`` is already under way: then its result.

    ``pending`` holds the lookups in flight; a caller cancelled while waiting does not cancel
    the lookup the others wait for.
    """
    future = pending.get(key)
    if future is None:
        future = asyncio.ensure_future(load())
        pending[key] = future
        future.add_done_callback(lambda _: pending.pop(key, None))
    return await asyncio.shield(future)
