"""Tools registered at run time through ``POST /register_new_tool``.

The posted code runs inside the node process (which is why the endpoint is off unless the config
enables it); it must define a function named like the tool, sync or async, optionally marked with
``@tool``. Accepted code is saved as ``<state_dir>/tools/<name>.py`` and registered again when the
node restarts.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import types
from pathlib import Path
from typing import Any

from toolserver.errors import ToolRegistrationError
from toolserver.node.registry import TOOL_NAME, Registry

log = logging.getLogger("toolserver.node")


def _tools_dir(registry: Registry) -> Path:
    return registry.ctx.state_dir / "tools"


def compile_tool(registry: Registry, tool_name: str, code: str) -> Any:
    """Run ``code`` in a fresh module and return the spec of its function ``tool_name`` (not yet added)."""
    if not TOOL_NAME.match(tool_name):
        raise ToolRegistrationError(
            f"invalid tool name {tool_name!r}: use letters, digits, '_' or '-', at most 64 characters"
        )
    if tool_name in registry.tools:
        raise ToolRegistrationError(f"a tool named {tool_name!r} already exists")
    try:
        compiled = compile(code, f"<registered tool {tool_name}>", "exec")
    except SyntaxError as exc:
        raise ToolRegistrationError(f"the code does not compile: {exc.msg} (line {exc.lineno})") from None
    module_name = f"toolserver_registered_{tool_name.replace('-', '_')}"
    module = types.ModuleType(module_name)
    module.__dict__["__builtins__"] = __builtins__
    sys.modules[module_name] = module
    try:
        exec(compiled, module.__dict__)
    except BaseException as exc:
        sys.modules.pop(module_name, None)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise ToolRegistrationError(f"running the code failed: {type(exc).__name__}: {exc}") from None
    func = module.__dict__.get(tool_name)
    if not callable(func) or inspect.isclass(func):
        sys.modules.pop(module_name, None)
        raise ToolRegistrationError(f"the code must define a function named {tool_name!r}")
    return registry.function_spec(func, origin="register_new_tool", name=tool_name)


def register_tool(registry: Registry, tool_name: str, code: str) -> dict[str, Any]:
    """Compile, register and persist a tool; returns its schema."""
    spec = compile_tool(registry, tool_name, code)
    schema = spec.schema()
    registry.add([spec])
    directory = _tools_dir(registry)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{tool_name}.py.tmp"
    tmp.write_text(code, encoding="utf-8")
    os.replace(tmp, directory / f"{tool_name}.py")
    return schema


def load_registered_tools(registry: Registry) -> int:
    """Register again every tool saved by an earlier run; failures are recorded in ``load_errors``."""
    directory = _tools_dir(registry)
    if not directory.is_dir():
        return 0
    count = 0
    for path in sorted(directory.glob("*.py")):
        try:
            spec = compile_tool(registry, path.stem, path.read_text(encoding="utf-8"))
            registry.add([spec])
            count += 1
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            log.error("registered tool %s not loaded: %s", path.name, message)
            registry.load_errors.append({"source": str(path), "error": message})
    return count
