"""Running the manager under uvicorn, with the request limits of :mod:`toolserver.manager.limits`."""

from __future__ import annotations

import asyncio
import functools

import uvicorn

from toolserver.logs import configure_logging
from toolserver.manager.app import create_app
from toolserver.manager.limits import LimitedHttpToolsProtocol
from toolserver.manager.settings import Settings
from toolserver.runtimes import create_runtime


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


async def preflight(settings: Settings) -> None:
    """The chosen runtime's :meth:`~toolserver.runtimes.base.Runtime.preflight` (ConfigError when it
    cannot run on this machine)."""
    runtime = create_runtime(settings.runtime_config, settings.runtime_context())
    try:
        await runtime.preflight()
    finally:
        await runtime.aclose()


def serve_manager(settings: Settings, log_level: str = "info") -> None:
    """Serve the manager; ConfigError (before serving) when its runtime cannot run here."""
    asyncio.run(preflight(settings))
    uvicorn.Server(uvicorn_config(settings, log_level)).run()
