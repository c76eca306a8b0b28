"""Logging of the manager and the checker: plain text or one JSON object per line (``log_format``).

The same format goes to uvicorn's loggers. httpx's one INFO line per request is silenced: the
process runtime's health checks would otherwise write one line per node per checker tick.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Loggers too chatty at INFO for a server's log.
QUIET = {"httpx": logging.WARNING, "httpcore": logging.WARNING, "alembic.runtime.plugins": logging.WARNING}


def log_config(level: str, fmt: Literal["text", "json"] = "text") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for the root logger and uvicorn's, in ``fmt``."""
    if fmt == "json":
        formatter: dict[str, Any] = {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s",
            "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
        }
    else:
        formatter = {"format": TEXT_FORMAT}
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "default"}},
        "root": {"handlers": ["default"], "level": level},
        "loggers": {
            "uvicorn": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.access": {"handlers": [], "level": level, "propagate": True},
            **{name: {"level": logging.getLevelName(lvl)} for name, lvl in QUIET.items()},
        },
    }


def configure_logging(level: str, fmt: Literal["text", "json"] = "text") -> dict[str, Any]:
    """Apply :func:`log_config` now and return it (uvicorn applies it again when it starts)."""
    import logging.config

    config = log_config(level, fmt)
    logging.config.dictConfig(config)
    return config
