"""Running the manager under uvicorn, with the request limits of :mod:`toolserver.manager.limits`."""

from __future__ import annotations

import functools

import uvicorn

from toolserver.logs import configure_logging
from toolserver.manager.app import create_app
from toolserver.manager.limits import LimitedHttpToolsProtocol
from toolserver.manager.settings import Settings


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


def serve_manager(settings: Settings, log_level: str = "info") -> None:
    uvicorn.Server(uvicorn_config(settings, log_level)).run()
