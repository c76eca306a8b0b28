"""Tool declaration (``@tool``, :class:`Env`) and the node's tool registry.

A tool is a plain function (sync or async) marked with ``@tool``, or a method marked with ``@tool``
on a subclass of :class:`Env`; env tools are named ``<Env>_<method>``. Modules are scanned for both.
Hidden tools are left out of ``/get_available_tools`` but can still be retrieved and executed.
Sync tools run in a worker thread, never on the event loop, except those marked
``@tool(inline=True)``: bounded, CPU-only work of microseconds (the calculator), for which the
hand-over to a thread costs more than the call.
"""

from __future__ import annotations

import asyncio
import difflib
import functools
import hashlib
import importlib
import importlib.util
import inspect
import logging
import re
import sys
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar, overload

from toolserver.errors import ToolError, ToolNotFound, ToolRegistrationError, ToolTimeout
from toolserver.node.context import NodeContext
from toolserver.node.schema import ToolSignature, build_signature, parse_docstring

log = logging.getLogger("toolserver.node")

F = TypeVar("F", bound=Callable[..., Any])

#: OpenAI function names: letters, digits, '_' and '-', at most 64.
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MARK = "__toolserver_tool__"


@dataclass(frozen=True)
class ToolOptions:
    name: str | None = None
    hidden: bool = False
    description: str | None = None
    inline: bool = False


@overload
def tool(func: F) -> F: ...
@overload
def tool(
    *, name: str | None = None, hidden: bool = False, description: str | None = None, inline: bool = False
) -> Callable[[F], F]: ...
def tool(
    func: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    hidden: bool = False,
    description: str | None = None,
    inline: bool = False,
) -> Any:
    """Mark a function or an Env method as a tool: ``@tool`` or ``@tool(name=..., hidden=True)``.

    ``inline=True`` runs a sync tool on the event loop rather than in a worker thread: only for
    work bounded to microseconds (it cannot be stopped by ``tool_timeout``, nor cancelled).
    """

    def mark(fn: F) -> F:
        setattr(fn, _MARK, ToolOptions(name=name, hidden=hidden, description=description, inline=inline))
        return fn

    return mark(func) if func is not None else mark


def tool_options(obj: Any) -> ToolOptions | None:
    opts = getattr(obj, _MARK, None)
    return opts if isinstance(opts, ToolOptions) else None


class Env:
    """A group of tools sharing state; one instance per node, built with the node context.

    Subclasses mark methods with ``@tool``; the env name defaults to the class name and its
    description to the class docstring. Override :meth:`aclose` to release resources at shutdown.
    """

    env_name: ClassVar[str | None] = None
    hidden: ClassVar[bool] = False

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx

    @classmethod
    def get_env_name(cls) -> str:
        return cls.env_name or cls.__name__

    async def aclose(self) -> None:
        """Release what the env holds (kernels, clients)."""


@dataclass
class ToolSpec:
    name: str
    func: Callable[..., Any]
    signature: ToolSignature
    description: str
    hidden: bool = False
    env: str | None = None
    origin: str = ""
    is_async: bool = False
    #: a bounded sync tool run on the event loop (see :func:`tool`)
    inline: bool = False
    _schema: dict[str, Any] | None = field(default=None, repr=False)

    def schema(self) -> dict[str, Any]:
        """The function-calling schema: ``{"name", "description", "parameters"}``."""
        if self._schema is None:
            self._schema = {
                "name": self.name,
                "description": self.description,
                "parameters": self.signature.json_schema(),
            }
        return self._schema

    def doc_text(self) -> str:
        """Everything retrieval may match: name, description and parameter docs."""
        params = self.schema()["parameters"]["properties"]
        parts = [self.name, self.env or "", self.description]
        for pname, prop in params.items():
            parts.append(pname)
            parts.append(str(prop.get("description", "")))
        return "\n".join(parts)


@dataclass
class EnvSpec:
    name: str
    description: str
    instance: Env
    tools: list[str] = field(default_factory=list)  # full tool names
    hidden: bool = False

    def as_json(self) -> dict[str, Any]:
        short = [t[len(self.name) + 1 :] for t in self.tools]
        return {"name": self.name, "description": self.description, "total_tools": len(short), "tools": short}


def make_spec(
    func: Callable[..., Any],
    name: str,
    *,
    hidden: bool = False,
    description: str | None = None,
    env: str | None = None,
    origin: str = "",
    inline: bool = False,
) -> ToolSpec:
    if not TOOL_NAME.match(name):
        raise ToolRegistrationError(
            f"invalid tool name {name!r}: use letters, digits, '_' or '-', at most 64 characters"
        )
    signature = build_signature(func, name)
    is_async = inspect.iscoroutinefunction(func)
    return ToolSpec(
        name=name,
        func=func,
        signature=signature,
        description=description or signature.description or name,
        hidden=hidden,
        env=env,
        origin=origin,
        is_async=is_async,
        inline=inline and not is_async,
    )


class Registry:
    """All tools and envs of one node."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.tools: dict[str, ToolSpec] = {}
        self.envs: dict[str, EnvSpec] = {}
        self.load_errors: list[dict[str, str]] = []
        #: bumped on every change, so caches (retrieval) know when to rebuild
        self.version = 0

    # -- registration ---------------------------------------------------------------------------

    def function_spec(self, func: Callable[..., Any], origin: str, name: str | None = None) -> ToolSpec:
        opts = tool_options(func) or ToolOptions()
        return make_spec(
            func,
            name or opts.name or func.__name__,
            hidden=opts.hidden,
            description=opts.description,
            origin=origin,
            inline=opts.inline,
        )

    def env_specs(self, cls: type[Env], origin: str) -> tuple[EnvSpec, list[ToolSpec]]:
        env_name = cls.get_env_name()
        if not TOOL_NAME.match(env_name):
            raise ToolRegistrationError(f"invalid env name {env_name!r}")
        instance = cls(self.ctx)
        specs = []
        seen: set[str] = set()
        for klass in cls.__mro__:
            for attr, value in vars(klass).items():
                opts = tool_options(value)
                if opts is None or attr in seen:
                    continue
                seen.add(attr)
                specs.append(
                    make_spec(
                        getattr(instance, attr),
                        f"{env_name}_{opts.name or attr}",
                        hidden=opts.hidden or cls.hidden,
                        description=opts.description,
                        env=env_name,
                        origin=origin,
                        inline=opts.inline,
                    )
                )
        description, _ = parse_docstring(inspect.getdoc(cls))
        env = EnvSpec(env_name, description, instance, [s.name for s in specs], hidden=cls.hidden)
        return env, specs

    def add(self, specs: Iterable[ToolSpec], envs: Iterable[EnvSpec] = ()) -> None:
        """Add tools (and envs) all together, or none of them when a name is taken."""
        specs, envs = list(specs), list(envs)
        names = [s.name for s in specs]
        taken = [n for n in names if n in self.tools] + [n for n in names if names.count(n) > 1]
        taken += [e.name for e in envs if e.name in self.envs]
        if taken:
            first = taken[0]
            where = self.tools[first].origin if first in self.tools else "the same module"
            raise ToolRegistrationError(f"duplicate tool or env name {first!r} (already defined by {where})")
        for spec in specs:
            self.tools[spec.name] = spec
        for env in envs:
            self.envs[env.name] = env
            self.ctx.add_closer(f"env:{env.name}", env.instance)
        self.version += 1

    def collect(self, module: types.ModuleType, origin: str) -> tuple[list[ToolSpec], list[EnvSpec]]:
        """Tools and envs defined in ``module`` (not those it merely imports)."""
        specs: list[ToolSpec] = []
        envs: list[EnvSpec] = []
        for value in list(vars(module).values()):
            if getattr(value, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(value) and issubclass(value, Env) and value is not Env:
                env, env_tools = self.env_specs(value, origin)
                envs.append(env)
                specs.extend(env_tools)
            elif callable(value) and tool_options(value) is not None and not inspect.isclass(value):
                specs.append(self.function_spec(value, origin))
        return specs, envs

    def load_module(self, module: types.ModuleType, origin: str | None = None) -> int:
        specs, envs = self.collect(module, origin or module.__name__)
        self.add(specs, envs)
        return len(specs)

    def load_extension(self, ref: str) -> bool:
        """Import and register an extension module; a failure is logged, recorded and skipped."""
        try:
            module = import_reference(ref)
            count = self.load_module(module, origin=ref)
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            log.error("extension %s not loaded: %s", ref, message)
            self.load_errors.append({"source": ref, "error": message})
            return False
        log.info("extension %s: %d tools", ref, count)
        return True

    # -- lookup -----------------------------------------------------------------------------

    def get(self, name: str, env_name: str | None = None) -> ToolSpec:
        if env_name:
            full = name if name.startswith(env_name + "_") else f"{env_name}_{name}"
            spec = self.tools.get(full)
            if spec is None or spec.env != env_name:
                if env_name not in self.envs:
                    raise ToolNotFound(f"no env named {env_name!r}; available envs: {sorted(self.envs)}")
                raise ToolNotFound(
                    f"env {env_name!r} has no tool {name!r}; it has: {self.envs[env_name].tools}"
                )
            return spec
        spec = self.tools.get(name)
        if spec is None:
            close = difflib.get_close_matches(name, list(self.tools), n=3)
            hint = (
                f"; did you mean {', '.join(close)}?" if close else "; POST /get_available_tools lists them"
            )
            raise ToolNotFound(f"no tool named {name!r}{hint}")
        return spec

    def visible(self) -> list[ToolSpec]:
        return [s for s in self.tools.values() if not s.hidden]

    # -- execution --------------------------------------------------------------------------

    async def execute(self, name: str, arguments: dict[str, Any], env_name: str | None = None) -> Any:
        """Validate and run one tool; any failure becomes a ToolError with its status code."""
        import anyio.to_thread

        spec = self.get(name, env_name)
        kwargs = spec.signature.bind(arguments)
        if spec.signature.context_param:
            kwargs[spec.signature.context_param] = self.ctx
        if spec.inline:
            try:
                return spec.func(**kwargs)
            except ToolError:
                raise
            except (Exception, SystemExit) as exc:
                raise _failed(spec, exc) from exc
        limit = self.ctx.config.tool_timeout
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                if spec.is_async:
                    result = await spec.func(**kwargs)
                else:
                    call = functools.partial(spec.func, **kwargs)
                    result = await anyio.to_thread.run_sync(call, abandon_on_cancel=True)
                if inspect.isawaitable(result):
                    result = await result
        except ToolError:
            raise
        except (Exception, SystemExit) as exc:
            if isinstance(exc, TimeoutError) and deadline.expired():
                raise ToolTimeout(
                    f"tool {spec.name} did not finish within {limit:g} s and was stopped"
                ) from None
            raise _failed(spec, exc) from exc
        return result


def _failed(spec: ToolSpec, exc: BaseException) -> ToolError:
    log.warning("tool %s failed", spec.name, exc_info=exc)
    text = str(exc) or repr(exc)
    return ToolError(f"tool {spec.name} failed: {type(exc).__name__}: {text}")


def import_reference(ref: str) -> types.ModuleType:
    """Import a dotted module name, or a ``.py`` file path."""
    if ref.endswith(".py") or "/" in ref:
        path = Path(ref).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
        stem = re.sub(r"\W", "_", path.stem)
        module_name = f"toolserver_ext_{stem}_{digest}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(module_name, None)
            raise
        return module
    return importlib.import_module(ref)
