"""ToolServer: a sandboxed tool server for every AI-agent session."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("toolserver")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = ["__version__"]
