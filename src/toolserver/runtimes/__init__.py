"""Where nodes run: local processes (the embedded default) or Docker containers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from toolserver.runtimes.base import NodeInfo, NodeSpec, Runtime

if TYPE_CHECKING:
    from toolserver.manager.settings import Settings


def create_runtime(settings: Settings) -> Runtime:
    """The runtime named by ``settings.runtime``."""
    if settings.runtime == "docker":
        from toolserver.runtimes.docker import DockerRuntime

        return DockerRuntime(settings)
    from toolserver.runtimes.process import ProcessRuntime

    return ProcessRuntime(settings)


__all__ = ["NodeInfo", "NodeSpec", "Runtime", "create_runtime"]
