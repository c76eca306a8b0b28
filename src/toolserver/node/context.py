"""The per-node context handed to tools: workspace path resolution, config and shared services.

Every path a file tool or endpoint receives goes through :meth:`NodeContext.locate`, which walks it
beneath the workspace without a check-then-use race and refuses anything that would land outside
(absolute paths elsewhere, ``..``, ``~``, NUL bytes, symlinks pointing out). :meth:`NodeContext.resolve`
(a real path, checked once) is left for what a shell is given anyway: a command's working directory.
Backslashes are read as separators, so ``..\\x`` is ``../x``.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from toolserver.errors import WorkspacePathError
from toolserver.node.beneath import Located, checked_text, locate
from toolserver.node.settings import NodeConfig

log = logging.getLogger("toolserver.node")

T = TypeVar("T")

#: Environment variables that never reach the processes tools start (shells, kernels).
_PRIVATE_ENV_PREFIX = "TOOLSERVER_NODE_"


def resolve_in_workspace(workspace: Path, raw: str) -> Path:
    """Return the real path of ``raw`` (relative to ``workspace``) or raise WorkspacePathError."""
    text = checked_text(raw)
    candidate = Path(text) if text else Path(".")
    target = candidate if candidate.is_absolute() else workspace / candidate
    real = Path(os.path.realpath(target))
    if real != workspace and not real.is_relative_to(workspace):
        raise WorkspacePathError(
            f"path {raw!r} leads outside the workspace; use a path relative to the workspace root"
        )
    return real


class NodeContext:
    """What a node shares with its tools. A tool receives it by declaring a parameter of this type."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        config.workspace.mkdir(parents=True, exist_ok=True)
        self.workspace = Path(os.path.realpath(config.workspace))
        self.state_dir = config.resolved_state_dir
        self._services: dict[str, Any] = {}
        self.child_env = {k: v for k, v in os.environ.items() if not k.startswith(_PRIVATE_ENV_PREFIX)}
        # scripts that plot render to files: there is no display in a node
        self.child_env.setdefault("MPLBACKEND", "Agg")

    @property
    def tmp_dir(self) -> Path:
        """Scratch space outside the workspace (zips being built, ...)."""
        path = self.state_dir / "tmp"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def resolve(self, path: str) -> Path:
        """The real path of workspace-relative ``path``; WorkspacePathError when it leaves the workspace."""
        return resolve_in_workspace(self.workspace, path)

    def locate(self, path: str, *, follow_final: bool = True, create_dirs: bool = False) -> Located:
        """Workspace-relative ``path`` walked beneath the workspace (see :mod:`toolserver.node.beneath`)."""
        return locate(self.workspace, path, follow_final=follow_final, create_dirs=create_dirs)

    def relative(self, path: Path) -> str:
        """``path`` relative to the workspace, in POSIX form ('.' for the root)."""
        return Path(os.path.relpath(path, self.workspace)).as_posix()

    def is_ignored(self, name: str) -> bool:
        """Whether an entry name matches one of the configured ignore patterns."""
        from fnmatch import fnmatch

        return any(fnmatch(name, pattern) for pattern in self.config.ignore_patterns)

    def service(self, key: str, factory: Callable[[NodeContext], T]) -> T:
        """A node-wide object created on first use and closed (``aclose``/``close``) at shutdown."""
        if key not in self._services:
            self._services[key] = factory(self)
        return self._services[key]

    def add_closer(self, key: str, obj: Any) -> None:
        """Close ``obj`` at shutdown too (env instances register themselves here)."""
        self._services.setdefault(key, obj)

    async def aclose(self) -> None:
        """Close every service, newest first; errors are logged, never raised."""
        for key, obj in reversed(list(self._services.items())):
            closer = getattr(obj, "aclose", None) or getattr(obj, "close", None)
            if closer is None:
                continue
            try:
                result = closer()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("closing %s failed", key)
        self._services.clear()
