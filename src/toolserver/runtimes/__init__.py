"""Where nodes run. Each runtime is one module (its class and its config model), found through
the registry (:mod:`toolserver.runtimes.registry`): local processes (``process``, the embedded
default) and Docker containers (``docker``) are built in; others come as packages."""

from __future__ import annotations

from toolserver.runtimes.base import (
    NodeInfo,
    NodeSpec,
    ResourceLimits,
    Runtime,
    RuntimeConfig,
    RuntimeContext,
)
from toolserver.runtimes.registry import create_runtime, runtime_class, runtime_names, validate_config

__all__ = [
    "NodeInfo",
    "NodeSpec",
    "ResourceLimits",
    "Runtime",
    "RuntimeConfig",
    "RuntimeContext",
    "create_runtime",
    "runtime_class",
    "runtime_names",
    "validate_config",
]
