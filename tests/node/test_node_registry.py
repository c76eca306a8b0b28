"""Tool declaration and schema generation, in process (no HTTP): docstrings, hints, duplicates."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Annotated

import pytest
from pydantic import Field

from toolserver.errors import ToolArgumentError, ToolError, ToolRegistrationError
from toolserver.node.context import NodeContext
from toolserver.node.registry import Env, Registry, tool
from toolserver.node.schema import parse_docstring
from toolserver.node.settings import NodeConfig


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(NodeContext(NodeConfig(workspace=tmp_path / "ws", state_dir=tmp_path / "state")))


def test_google_and_sphinx_docstrings() -> None:
    description, params = parse_docstring(
        """Do a thing
        over two lines.

        Args:
            alpha (int): first one,
                continued here.
            beta: second one.

        Returns:
            nothing much.
        """
    )
    assert description == "Do a thing over two lines.\n\nReturns:\n    nothing much."
    assert params == {"alpha": "first one, continued here.", "beta": "second one."}
    description, params = parse_docstring(
        """Sphinx style.

        :param string? command: The command
            to run.
        :type command: str
        :param integer? shell_id: An id.
        """
    )
    assert description == "Sphinx style."
    assert params == {"command": "The command to run.", "shell_id": "An id."}


def test_schema_from_function(registry: Registry) -> None:
    @tool(name="renamed")
    async def original(
        ctx: NodeContext,
        path: str,
        limit: Annotated[int, Field(description="from Annotated", le=10)] = 3,
        flag: bool | None = None,
        model_name: str = "x",
    ) -> str:
        """Summary line.

        Args:
            path: where to look
            limit: ignored, Annotated wins
        """
        return path

    module = types.ModuleType("fake_tools")
    original.__module__ = "fake_tools"
    module.original = original
    registry.load_module(module)
    spec = registry.get("renamed")
    assert spec.is_async and spec.signature.context_param == "ctx"
    assert spec.schema() == {
        "name": "renamed",
        "description": "Summary line.",
        "parameters": {
            "type": "object",
            "properties": {
                "path": {"type": "string", "description": "where to look"},
                "limit": {"type": "integer", "maximum": 10, "default": 3, "description": "from Annotated"},
                "flag": {"type": "boolean", "default": None},
                "model_name": {"type": "string", "default": "x"},
            },
            "required": ["path"],
        },
    }
    assert spec.signature.bind({"path": "a", "model_name": "m"}) == {
        "path": "a",
        "limit": 3,
        "flag": None,
        "model_name": "m",
    }
    with pytest.raises(ToolArgumentError, match="'limit'"):
        spec.signature.bind({"path": "a", "limit": 11})


def test_env_tools_are_prefixed_and_duplicates_refused(registry: Registry) -> None:
    class Shelf(Env):
        """Books."""

        @tool
        def count(self) -> int:
            return 1

        @tool(hidden=True)
        def secret(self) -> int:
            return 2

    env, specs = registry.env_specs(Shelf, "test")
    registry.add(specs, [env])
    assert [s.name for s in specs] == ["Shelf_count", "Shelf_secret"]
    assert registry.get("count", env_name="Shelf").name == "Shelf_count"
    assert [s.name for s in registry.visible()] == ["Shelf_count"]
    env2, specs2 = registry.env_specs(Shelf, "again")
    with pytest.raises(ToolRegistrationError, match="duplicate"):
        registry.add(specs2, [env2])


def test_functions_that_cannot_be_tools(registry: Registry) -> None:
    def star(*args: int) -> None: ...

    def kw(**kwargs: int) -> None: ...

    def positional(a: int, /) -> None: ...

    for func in (star, kw, positional):
        with pytest.raises(ToolRegistrationError):
            registry.function_spec(func, "test")
    with pytest.raises(ToolRegistrationError, match="invalid tool name"):
        registry.function_spec(lambda: 1, "test", name="has space")


@pytest.mark.asyncio
async def test_inline_tools_run_on_the_event_loop_and_others_in_a_worker_thread(registry: Registry) -> None:
    import threading

    @tool(inline=True)
    def quick(x: int) -> str:
        """Where it ran."""
        return threading.current_thread().name

    @tool
    def slow(x: int) -> str:
        """Where it ran."""
        return threading.current_thread().name

    @tool(inline=True)
    def broken(x: int) -> int:
        """Fails."""
        raise ValueError("no")

    module = types.ModuleType("inline_tools")
    for fn in (quick, slow, broken):
        fn.__module__ = module.__name__
        setattr(module, fn.__name__, fn)
    registry.load_module(module)
    here = threading.current_thread().name
    assert await registry.execute("quick", {"x": 1}) == here
    assert await registry.execute("slow", {"x": 1}) != here
    with pytest.raises(ToolArgumentError):  # arguments are still validated
        await registry.execute("quick", {"x": "not a number"})
    with pytest.raises(ToolError, match="tool broken failed: ValueError: no"):
        await registry.execute("broken", {"x": 1})
