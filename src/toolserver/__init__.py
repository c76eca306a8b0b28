"""ToolServer: a sandboxed tool server for every AI-agent session."""

#: The package version (pyproject.toml reads it from here).
__version__ = "0.1.0"

__all__ = ["__version__"]
