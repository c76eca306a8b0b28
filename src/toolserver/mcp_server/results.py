"""Node answers in MCP's terms: tools, tool results, workspace files as resources.

Tool results map faithfully: text stays text, other JSON values become their JSON text (an object
also as ``structuredContent``), a binary result becomes image or audio content with its media
type (other media an embedded blob), a composite result its parts in order. Error answers become
tool errors (``isError``) with the node's message; 450 (output not ready) is not an error: its text
says how to fetch the rest later.
"""

from __future__ import annotations

import base64
import json
import mimetypes
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import mcp.types as types

from toolserver.errors import ResourceError
from toolserver.mcp_server.sandbox import FileData, NodeAnswer
from toolserver.node.results import WRAPPED_TYPES
from toolserver.protocol import STATUS_OUTPUT_NOT_READY

#: Scheme of the workspace's files as MCP resources: ``workspace:///dir/file.txt``.
WORKSPACE_SCHEME = "workspace"
WORKSPACE_TEMPLATE = "workspace:///{path}"
_TEXT_TYPES = ("application/json", "application/xml", "application/javascript", "application/x-sh")

Content = types.TextContent | types.ImageContent | types.AudioContent | types.EmbeddedResource


def tools_from_schemas(schemas: list[dict[str, Any]]) -> list[types.Tool]:
    """The node's function-calling schemas (``/get_available_tools``) as MCP tools."""
    return [
        types.Tool(
            name=s["name"],
            description=s.get("description") or None,
            input_schema=s.get("parameters") or {"type": "object", "properties": {}},
        )
        for s in schemas
    ]


def tool_result(answer: NodeAnswer) -> types.CallToolResult:
    """An ``/execute_tool`` answer as an MCP tool result."""
    if answer.status == 200:
        body = answer.body
        structured = body["data"] if _wrapped(body, "simple") and isinstance(body["data"], dict) else None
        return types.CallToolResult(content=list(_content(body)), structured_content=structured)
    if answer.status == STATUS_OUTPUT_NOT_READY:
        partial = (
            {k: v for k, v in answer.body.items() if k != "detail"} if isinstance(answer.body, dict) else {}
        )
        text = f"Output not ready: {answer.detail}"
        if isinstance(partial.get("output"), str) and partial["output"]:
            text += f"\n\nOutput so far:\n{partial['output']}"
        return types.CallToolResult(
            content=[types.TextContent(text=text)], structured_content=partial or None, is_error=False
        )
    return tool_error(
        answer.detail if answer.status in (403, 404, 422, 499, 500) else f"{answer.status}: {answer.detail}"
    )


def tool_error(message: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(text=message)], is_error=True)


def _wrapped(value: Any, kind: str | None = None) -> bool:
    if not (isinstance(value, dict) and value.get("type") in WRAPPED_TYPES and "data" in value):
        return False
    return kind is None or value["type"] == kind


def _content(value: Any) -> Iterator[Content]:
    if _wrapped(value, "composite"):
        for item in value["data"]:
            yield from _content(item)
    elif _wrapped(value, "binary"):
        media = value.get("media_type") or "application/octet-stream"
        if media.startswith("image/"):
            yield types.ImageContent(data=value["data"], mime_type=media)
        elif media.startswith("audio/"):
            yield types.AudioContent(data=value["data"], mime_type=media)
        else:
            uri = f"result:///{quote(value.get('name') or 'output')}"
            blob = types.BlobResourceContents(uri=uri, mime_type=media, blob=value["data"])
            yield types.EmbeddedResource(resource=blob)
    elif _wrapped(value, "simple"):
        yield from _content(value["data"])
    elif isinstance(value, str):
        yield types.TextContent(text=value)
    else:
        yield types.TextContent(text=json.dumps(value, ensure_ascii=False, indent=1))


# ---- workspace files as resources ---------------------------------------------------------------


def file_uri(path: str) -> str:
    return f"{WORKSPACE_SCHEME}:///{quote(path.lstrip('/'))}"


def uri_path(uri: str) -> str:
    """The workspace path of a ``workspace:///…`` URI; ResourceError for anything else."""
    parts = urlsplit(uri)
    path = unquote(parts.path).lstrip("/")
    if parts.scheme != WORKSPACE_SCHEME or parts.netloc or not path:
        raise ResourceError(f"{uri!r} is not a workspace file; use {WORKSPACE_TEMPLATE}")
    return path


def resources_from_tree(tree: dict[str, Any]) -> list[types.Resource]:
    """The files of ``/get_workspace_structure``'s tree, as resources."""
    out = []
    for entry in _files(tree):
        path = entry["path"]
        out.append(
            types.Resource(
                uri=file_uri(path),
                name=path,
                mime_type=mimetypes.guess_type(path)[0],
                size=entry.get("size"),
            )
        )
    return out


def _files(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for child in node.get("children") or []:
        if child.get("type") == "file" and isinstance(child.get("path"), str):
            yield child
        elif child.get("type") == "directory":
            yield from _files(child)


def resource_contents(uri: str, file: FileData) -> types.TextResourceContents | types.BlobResourceContents:
    """Text for text files (and any file that is valid UTF-8), base64 for the rest."""
    media = file.media_type
    texty = media.startswith("text/") or media in _TEXT_TYPES or media == "application/octet-stream"
    if texty:
        try:
            text = file.data.decode("utf-8")
            media = "text/plain" if media == "application/octet-stream" else media
            return types.TextResourceContents(uri=uri, mime_type=media, text=text)
        except UnicodeDecodeError:
            pass
    blob = base64.b64encode(file.data).decode("ascii")
    return types.BlobResourceContents(uri=uri, mime_type=media, blob=blob)
