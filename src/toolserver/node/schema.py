"""JSON schemas and argument validation for tools, built from signatures and docstrings.

A tool's parameters become a pydantic model (unknown arguments refused). Descriptions come from
``Annotated[..., Field(description=...)]`` or, failing that, the docstring's ``Args:`` section
(Google style) or ``:param name:`` lines (Sphinx style). The tool description is the docstring
without those parameter docs. A parameter typed :class:`NodeContext` is injected by the node and
left out of the schema.
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from toolserver.errors import ToolArgumentError, ToolRegistrationError
from toolserver.node.context import NodeContext

MAX_DESCRIPTION = 1024

_SECTION = re.compile(
    r"^(args|arguments|parameters|params|keyword args|returns?|yields?|raises|examples?|notes?|attributes)"
    r"\s*:\s*$",
    re.IGNORECASE,
)
_ARG_SECTIONS = {"args", "arguments", "parameters", "params", "keyword args"}
_GOOGLE_ENTRY = re.compile(r"^\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")
_SPHINX_PARAM = re.compile(r"^:param\s+(?:[^:]*?\s)?\*{0,2}(\w+)\s*:\s*(.*)$")
_SPHINX_TYPE = re.compile(r"^:type\s+\w+\s*:")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """Split a docstring into (description, {parameter: description})."""
    if not doc:
        return "", {}
    lines = inspect.cleandoc(doc).splitlines()
    kept: list[str] = []
    params: dict[str, str] = {}
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        header = _SECTION.match(stripped)
        if header and header.group(1).lower() in _ARG_SECTIONS:
            base = _indent(line)
            i += 1
            current: str | None = None
            entry_indent: int | None = None
            while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
                body = lines[i]
                if body.strip():
                    if entry_indent is None:
                        entry_indent = _indent(body)
                    match = _GOOGLE_ENTRY.match(body.strip()) if _indent(body) == entry_indent else None
                    if match:
                        current = match.group(1)
                        params[current] = match.group(2).strip()
                    elif current:
                        params[current] = (params[current] + " " + body.strip()).strip()
                i += 1
            continue
        sphinx = _SPHINX_PARAM.match(stripped)
        if sphinx:
            name, text = sphinx.group(1), sphinx.group(2).strip()
            base = _indent(line)
            i += 1
            while i < len(lines) and lines[i].strip() and _indent(lines[i]) > base:
                text += " " + lines[i].strip()
                i += 1
            params[name] = text
            continue
        if _SPHINX_TYPE.match(stripped):
            i += 1
            continue
        kept.append(line)
        i += 1
    return _reflow(kept), params


def _reflow(lines: list[str]) -> str:
    """Join the wrapped lines of each paragraph; blank lines, list items and indented lines stay."""
    out: list[str] = []
    for line in lines:
        stripped = line.strip()
        joinable = (
            out
            and out[-1]
            and stripped
            and not line.startswith((" ", "\t"))
            and not stripped.startswith(("-", "*", "```", ">"))
            and not out[-1].lstrip().startswith("```")
        )
        if joinable:
            out[-1] = f"{out[-1]} {stripped}"
        else:
            out.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def _is_context(annotation: Any) -> bool:
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    return inspect.isclass(annotation) and issubclass(annotation, NodeContext)


def _has_description(annotation: Any) -> bool:
    if typing.get_origin(annotation) is not Annotated:
        return False
    return any(getattr(meta, "description", None) for meta in typing.get_args(annotation)[1:])


@dataclass
class ToolSignature:
    """The validated view of a tool's parameters."""

    model: Any  # a pydantic model class
    context_param: str | None
    #: model field name -> python parameter name
    fields: dict[str, str]
    description: str

    def bind(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """Validate ``arguments``; return keyword arguments for the call (context not included)."""
        from pydantic import ValidationError

        try:
            parsed = self.model.model_validate(arguments)
        except ValidationError as exc:
            raise ToolArgumentError(describe_validation_error(exc)) from None
        return {param: getattr(parsed, field) for field, param in self.fields.items()}

    def json_schema(self) -> dict[str, Any]:
        """``{"type": "object", "properties", "required"}`` (plus ``$defs`` when nested models appear)."""
        raw = self.model.model_json_schema()
        schema: dict[str, Any] = {
            "type": "object",
            "properties": _clean(raw.get("properties", {}), in_properties=True),
            "required": list(raw.get("required", [])),
        }
        if "$defs" in raw:
            schema["$defs"] = _clean(raw["$defs"], in_properties=True)
        return schema


def describe_validation_error(exc: Any) -> str:
    """One line per problem, each naming the argument."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            parts.append(f"unexpected argument '{loc}'")
        elif err["type"] == "missing":
            parts.append(f"missing required argument '{loc}'")
        elif loc:
            parts.append(f"argument '{loc}': {err['msg']} (got {err.get('input')!r:.80})")
        else:
            parts.append(f"arguments: {err['msg']}")
    return "invalid arguments: " + "; ".join(parts)


def _clean(node: Any, in_properties: bool = False) -> Any:
    """Drop pydantic's auto titles and collapse ``X | None`` to ``X`` (the default tells it is optional)."""
    if isinstance(node, list):
        return [_clean(item) for item in node]
    if not isinstance(node, dict):
        return node
    if in_properties:
        return {key: _clean(value) for key, value in node.items()}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "title":
            continue
        out[key] = _clean(value, in_properties=key in ("properties", "$defs"))
    any_of = out.get("anyOf")
    if isinstance(any_of, list) and len(any_of) == 2 and {"type": "null"} in any_of:
        other = next(item for item in any_of if item != {"type": "null"})
        out.pop("anyOf")
        out = {**other, **out}
    return out


def build_signature(func: Callable[..., Any], tool_name: str) -> ToolSignature:
    """Inspect ``func`` and build its argument model; raise ToolRegistrationError when it cannot be a tool."""
    from pydantic import ConfigDict, Field, create_model

    try:
        sig = inspect.signature(func)
        hints = typing.get_type_hints(func, include_extras=True)
    except (TypeError, ValueError, NameError) as exc:
        raise ToolRegistrationError(f"tool {tool_name!r}: cannot read its signature: {exc}") from exc
    description, docs = parse_docstring(inspect.getdoc(func))
    fields: dict[str, Any] = {}
    mapping: dict[str, str] = {}
    context_param = None
    reserved = set(dir(_base_model()))
    for index, (name, param) in enumerate(sig.parameters.items()):
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
            raise ToolRegistrationError(
                f"tool {tool_name!r}: parameter {name!r} must be a plain or keyword-only parameter"
            )
        annotation = hints.get(name, Any)
        if _is_context(annotation):
            context_param = name
            continue
        default = ... if param.default is param.empty else param.default
        extra: dict[str, Any] = {}
        if docs.get(name) and not _has_description(annotation):
            extra["description"] = docs[name]
        field_name = name
        if name.startswith("_") or name.startswith("model_") or name in reserved:
            field_name = f"arg_{index}"
            extra["alias"] = name
        fields[field_name] = (annotation, Field(default, **extra))
        mapping[field_name] = name
    try:
        model = create_model(
            f"{tool_name}_arguments",
            __config__=ConfigDict(
                extra="forbid", arbitrary_types_allowed=True, protected_namespaces=(), allow_inf_nan=False
            ),
            **fields,
        )
    except Exception as exc:
        raise ToolRegistrationError(f"tool {tool_name!r}: unsupported parameter types: {exc}") from exc
    if len(description) > MAX_DESCRIPTION:
        description = description[: MAX_DESCRIPTION - 3] + "..."
    return ToolSignature(model=model, context_param=context_param, fields=mapping, description=description)


def _base_model() -> type:
    from pydantic import BaseModel

    return BaseModel
