"""Running the manager under uvicorn, with the request limits of :mod:`toolserver.manager.limits`."""

from __future__ import annotations

import asyncio
import functools
import logging

import psutil
import uvicorn

from toolserver.logs import configure_logging
from toolserver.manager.app import create_app
from toolserver.manager.limits import LimitedHttpToolsProtocol
from toolserver.manager.settings import Settings
from toolserver.manager.store import wait_for_database
from toolserver.runtimes import create_runtime
from toolserver.runtimes.sandbox_config import parse_size

log = logging.getLogger(__name__)

#: tiers that hold their nodes to node.resources.memory on the manager's own host
MEMORY_LIMITED_HERE = frozenset({"sandbox", "docker", "gvisor"})


def uvicorn_config(settings: Settings, log_level: str = "info") -> uvicorn.Config:
    limits = settings.limits
    return uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        log_config=configure_logging(log_level, settings.log_format),
        http=functools.partial(LimitedHttpToolsProtocol, limits=limits),  # type: ignore[arg-type]
        ws="websockets-sansio",  # the terminal (a WebSocket on a forwarded GET path)
        server_header=False,
        proxy_headers=False,
        timeout_keep_alive=limits.keep_alive_seconds,  # type: ignore[arg-type]  # a float works
        timeout_graceful_shutdown=10,
    )


def memory_overcommit(settings: Settings, host_bytes: int) -> str | None:
    """What is wrong when ``node.max_nodes`` nodes at their memory limit need more than
    ``host_bytes`` (None: they fit, or nodes have no memory limit)."""
    memory = settings.node.resources.memory
    if memory is None:
        return None
    need = settings.node.max_nodes * parse_size(memory)
    if need <= host_bytes:
        return None
    return (
        f"node.max_nodes ({settings.node.max_nodes}) x node.resources.memory ({memory}) is "
        f"{need / 2**30:.1f} GiB, more than this host's {host_bytes / 2**30:.1f} GiB: busy nodes can "
        "exhaust its memory before max_nodes stops new ones (lower either, or use API-key quotas)"
    )


async def preflight(settings: Settings) -> None:
    """The database, waited for (DatabaseUnavailable when it does not answer within
    ``database_wait_seconds``); the chosen runtime's :meth:`~toolserver.runtimes.base.Runtime.preflight`
    (ConfigError when it cannot run on this machine); a warning when its nodes could need more memory
    than the host has."""
    await wait_for_database(settings.database_url, settings.database_wait_seconds)
    if settings.isolation in MEMORY_LIMITED_HERE:
        overcommit = memory_overcommit(settings, psutil.virtual_memory().total)
        if overcommit:
            log.warning("%s", overcommit)
    runtime = create_runtime(settings.runtime_config, settings.runtime_context())
    try:
        await runtime.preflight()
    finally:
        await runtime.aclose()


def serve_manager(settings: Settings, log_level: str = "info") -> None:
    """Serve the manager; ConfigError (before serving) when its runtime cannot run here,
    DatabaseUnavailable when its database does not answer in time."""
    configure_logging(log_level, settings.log_format)  # preflight's warnings in the configured form
    asyncio.run(preflight(settings))
    uvicorn.Server(uvicorn_config(settings, log_level)).run()
