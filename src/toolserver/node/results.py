"""Tool results on the wire, in the shapes XAgent's client unwraps.

* plain JSON values (str, int, float, bool, list, None) travel as they are;
* ``{"type": "simple", "data": ...}`` wraps dicts and anything else (so a dict is never mistaken for a
  wrapper);
* ``{"type": "binary", "media_type", "name", "data": <base64>}`` carries images and files;
* ``{"type": "composite", "data": [...]}`` carries several results (a tuple or :class:`Composite`).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
from pathlib import PurePath
from typing import Any

WRAPPED_TYPES = ("simple", "binary", "composite")


@dataclasses.dataclass
class Binary:
    """Binary output (an image, a file): sent base64-encoded."""

    data: bytes
    media_type: str = "application/octet-stream"
    name: str | None = None


@dataclasses.dataclass
class Composite:
    """Several outputs in one answer."""

    items: list[Any]


def is_wrapped(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("type") in WRAPPED_TYPES and "data" in obj


def wrap_result(obj: Any) -> Any:
    """Turn a tool's return value into its wire shape."""
    if isinstance(obj, Binary):
        return {
            "type": "binary",
            "media_type": obj.media_type,
            "name": obj.name,
            "data": base64.b64encode(obj.data).decode("ascii"),
        }
    if isinstance(obj, bytes | bytearray | memoryview):
        return wrap_result(Binary(bytes(obj)))
    if isinstance(obj, Composite):
        return {"type": "composite", "data": [wrap_result(item) for item in obj.items]}
    if isinstance(obj, tuple):
        return {"type": "composite", "data": [wrap_result(item) for item in obj]}
    if obj is None or isinstance(obj, str | bool | int):
        return obj
    if isinstance(obj, list):
        return to_jsonable(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, dict) and is_wrapped(obj):
        return obj
    return {"type": "simple", "data": to_jsonable(obj)}


def to_jsonable(obj: Any) -> Any:
    """A JSON-friendly copy of ``obj``; unknown objects become their ``str``."""
    if obj is None or isinstance(obj, str | bool | int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, Binary | Composite):
        return wrap_result(obj)
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, bytes | bytearray):
        return base64.b64encode(bytes(obj)).decode("ascii")
    if isinstance(obj, PurePath):
        return obj.as_posix()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    dump = getattr(obj, "model_dump", None)
    if callable(dump):
        try:
            return to_jsonable(dump(mode="json"))
        except Exception:
            pass
    return str(obj)


def dumps(content: Any) -> bytes:
    """Serialise a response body; never fails on odd values."""
    try:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    except (TypeError, ValueError):
        return json.dumps(to_jsonable(content), ensure_ascii=False, separators=(",", ":")).encode()
