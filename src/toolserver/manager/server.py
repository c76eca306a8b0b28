"""Running the manager under uvicorn."""

from __future__ import annotations

import logging

import uvicorn

from toolserver.manager.app import create_app
from toolserver.manager.settings import Settings


def uvicorn_config(settings: Settings, log_level: str = "info") -> uvicorn.Config:
    return uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        server_header=False,
        proxy_headers=False,
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_graceful_shutdown=10,
    )


def serve_manager(settings: Settings, log_level: str = "info") -> None:
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # alembic announces each of its plugins at INFO on every start; the migrations it runs stay visible
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    uvicorn.Server(uvicorn_config(settings, log_level)).run()
