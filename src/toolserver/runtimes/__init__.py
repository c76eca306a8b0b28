"""Where nodes run: local processes (the embedded default) or Docker containers."""

from toolserver.runtimes.base import NodeInfo, NodeSpec, Runtime

__all__ = ["NodeInfo", "NodeSpec", "Runtime"]
