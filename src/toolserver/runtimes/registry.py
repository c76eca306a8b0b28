"""The one registry of runtimes: the entry-point group ``toolserver.runtimes``.

Each entry point maps a runtime's name (the manager's ``isolation`` setting) to its class,
``"package.module:RuntimeClass"``; the class carries its config model (``config_model``). The
built-ins ``process`` and ``docker`` are declared in ToolServer's own ``pyproject.toml``; a
third-party runtime (Kubernetes, say) is one package that declares one more::

    [project.entry-points."toolserver.runtimes"]
    kubernetes = "toolserver_kubernetes:KubernetesRuntime"

Looking a name up imports only that runtime's module. Every failure is a :class:`ConfigError`
that says what to do: an unknown name lists the names that exist.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from pydantic import ValidationError

from toolserver.config import describe_validation_error
from toolserver.errors import ConfigError
from toolserver.runtimes.base import Runtime, RuntimeConfig, RuntimeContext

GROUP = "toolserver.runtimes"


def runtime_names() -> list[str]:
    """The names of every registered runtime, sorted."""
    return sorted({ep.name for ep in entry_points(group=GROUP)})


def _entry_point(name: str) -> EntryPoint:
    found = list(entry_points(group=GROUP, name=name))
    if not found:
        names = runtime_names()
        if not names:
            raise ConfigError(
                f"no runtime is registered (entry-point group {GROUP!r} is empty): "
                "install the package, e.g. 'make venv' or 'pip install -e .'"
            )
        raise ConfigError(f"unknown runtime {name!r}; the registered runtimes are {', '.join(names)}")
    values = sorted({ep.value for ep in found})
    if len(values) > 1:
        raise ConfigError(f"runtime {name!r} is registered twice ({' and '.join(values)}); uninstall one")
    return found[0]


def runtime_class(name: str) -> type[Runtime]:
    """The runtime class registered as ``name``; ConfigError when there is none or it is broken."""
    ep = _entry_point(name)
    try:
        cls = ep.load()
    except Exception as exc:
        raise ConfigError(f"runtime {name!r} ({ep.value}) cannot be loaded: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Runtime)):
        raise ConfigError(f"runtime {name!r}: {ep.value} is not a toolserver.runtimes.Runtime subclass")
    model = getattr(cls, "config_model", None)
    if not (isinstance(model, type) and issubclass(model, RuntimeConfig)):
        raise ConfigError(f"runtime {name!r}: {ep.value} has no config_model (a RuntimeConfig subclass)")
    if getattr(cls, "name", None) != name:
        raise ConfigError(
            f"runtime {name!r}: {ep.value} calls itself {getattr(cls, 'name', None)!r}; the names must match"
        )
    return cls


def validate_config(
    name: str, data: Mapping[str, Any], prefix: str = "runtime_config", paths: Mapping[str, str] | None = None
) -> RuntimeConfig:
    """``data`` validated by runtime ``name``'s config model.

    A ConfigError names each bad key by its full dotted path: ``prefix.<key>``, or ``paths[key]``
    for a key that was given elsewhere (XAgent's ``node.image``, say).
    """
    model = runtime_class(name).config_model
    paths = dict(paths or {})
    given = data.get("type", name)
    if given != name:
        raise ConfigError(
            f"'{prefix}.type' is {given!r} but the runtime is {name!r}; remove it or make them equal"
        )

    def where(loc: tuple[int | str, ...]) -> str:
        if not loc:
            return prefix
        head, rest = str(loc[0]), ".".join(str(p) for p in loc[1:])
        path = paths.get(head) or f"{prefix}.{head}"
        return f"{path}.{rest}" if rest else path

    context = {"paths": {key: paths.get(key) or f"{prefix}.{key}" for key in data}}
    try:
        return model.model_validate({**data, "type": name}, context=context)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, where)) from None


def create_runtime(config: RuntimeConfig, context: RuntimeContext) -> Runtime:
    """A new runtime of the kind ``config`` is tagged with."""
    return runtime_class(config.type)(config, context)
