"""The node's OpenAPI document (``GET /openapi.json``, behind the node secret like every route).

Built from the same pydantic models of :mod:`toolserver.protocol` that validate the bodies, plus
one ``/execute_tool`` body variant per registered tool whose ``arguments`` are that tool's
parameter schema, so the document says exactly what this node runs.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from toolserver import __version__, protocol
from toolserver.node.registry import Registry

REF = "#/components/schemas/{model}"
BODY_MODELS: list[type[BaseModel]] = [
    protocol.ExecuteToolRequest,
    protocol.DownloadFileRequest,
    protocol.ToolNamesRequest,
    protocol.EnvNamesRequest,
    protocol.RetrieveToolsRequest,
    protocol.RegisterToolRequest,
    protocol.CommandRequest,
    protocol.CommandConnectRequest,
    protocol.CommandStdinRequest,
    protocol.CommandIdRequest,
    protocol.FilePathRequest,
]
NDJSON = {
    "description": "NDJSON events: start, stdout/stderr chunks, keepalive, dropped, then exit or detached",
    "content": {protocol.NDJSON_MEDIA_TYPE: {"schema": {}}},
}


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": REF.format(model="Detail")}}},
    }


def _json(schema: dict[str, Any] | None = None, description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema or {}}}}


COMMON = {
    "400": _error("malformed body: not JSON, not an object, NaN or Infinity, or invalid Unicode"),
    "401": _error("missing or wrong X-ToolServer-Node-Secret header"),
    "413": _error("body larger than request_max_bytes"),
    "422": _error("the body does not match the schema (names the field)"),
}


def _ref(model: type[BaseModel]) -> dict[str, Any]:
    return {"$ref": REF.format(model=model.__name__)}


def _post(
    summary: str, body: dict[str, Any] | None, responses: dict[str, Any], required: bool = True
) -> dict:
    operation: dict[str, Any] = {"summary": summary, "responses": {**responses, **COMMON}}
    if body is not None:
        operation["requestBody"] = {"required": required, "content": {"application/json": {"schema": body}}}
    return {"post": operation}


def _tool_variants(registry: Registry) -> list[dict[str, Any]]:
    """One ``execute_tool`` body per tool: its name as a constant, its parameters as ``arguments``."""
    variants = []
    for name, spec in sorted(registry.tools.items()):
        parameters = spec.schema()["parameters"]
        if "$defs" in parameters:  # local references would not resolve inside this document
            continue
        properties: dict[str, Any] = {"tool_name": {"const": name}, "arguments": parameters}
        if spec.env:
            properties["env_name"] = {"const": spec.env}
        variants.append(
            {
                "title": name,
                "type": "object",
                "properties": properties,
                "required": ["tool_name", "arguments"],
                "additionalProperties": False,
            }
        )
    return variants


def node_openapi(registry: Registry) -> dict[str, Any]:
    """The OpenAPI 3.1 document of a node with ``registry``'s tools."""
    _, top = models_json_schema([(m, "validation") for m in BODY_MODELS], ref_template=REF)
    schemas: dict[str, Any] = dict(top.get("$defs", {}))
    schemas["Detail"] = {
        "type": "object",
        "properties": {"detail": {"type": "string"}},
        "required": ["detail"],
    }
    execute_body = {"anyOf": [*_tool_variants(registry), _ref(protocol.ExecuteToolRequest)]}
    upload = {
        "type": "object",
        "properties": {
            "file": {"type": "string", "format": "binary"},
            "filename": {"type": "string", "description": "name in the workspace (default: the file's)"},
            "path": {"type": "string", "description": "directory or file path in the workspace"},
        },
        "required": ["file"],
    }
    paths: dict[str, Any] = {
        "/": {
            "get": {"summary": "the node's version, tool count and envs", "responses": {"200": _json()}},
            **_post("the same greeting", None, {"200": _json()}),
        },
        "/health": {
            "get": {"summary": "liveness (no secret)", "security": [], "responses": {"200": _json()}}
        },
        "/openapi.json": {"get": {"summary": "this document", "responses": {"200": _json()}}},
        "/get_available_tools": _post(
            "the visible tools and envs with their schemas", None, {"200": _json()}
        ),
        "/get_json_schema_for_tools": _post(
            "schemas of the named tools", _ref(protocol.ToolNamesRequest), {"200": _json()}
        ),
        "/get_json_schema_for_envs": _post(
            "descriptions of the named envs", _ref(protocol.EnvNamesRequest), {"200": _json()}
        ),
        "/retrieving_tools": _post(
            "the tools that best match a question", _ref(protocol.RetrieveToolsRequest), {"200": _json()}
        ),
        "/execute_tool": _post(
            "run a tool; its result comes wrapped (simple, binary, composite)",
            execute_body,
            {
                "200": _json(description="the tool's wrapped result"),
                "404": _error("no tool by that name"),
                "450": _error("output not ready or the tool timed out; carries its partial output"),
                "500": _error("the tool reported an error"),
            },
        ),
        "/register_new_tool": _post(
            "register a tool from Python code (allow_register_tool)",
            _ref(protocol.RegisterToolRequest),
            {"200": _json(), "403": _error("registering tools is disabled on this node")},
        ),
        "/upload_file": {
            "post": {
                "summary": "stream a file into the workspace",
                "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": upload}}},
                "responses": {"200": _json(), **COMMON},
            }
        },
        "/download_file": _post(
            "stream a workspace file",
            _ref(protocol.DownloadFileRequest),
            {
                "200": {"description": "the file", "content": {"application/octet-stream": {"schema": {}}}},
                "404": _error("no such file in the workspace"),
            },
        ),
        "/download_workspace": _post(
            "the workspace as a zip file",
            None,
            {"200": {"description": "zip", "content": {"application/zip": {"schema": {}}}}},
        ),
        "/get_workspace_structure": _post("the workspace tree", None, {"200": _json()}),
        "/commands": {
            "get": {"summary": "the commands there are", "responses": {"200": _json(), **COMMON}},
            **_post(
                "run a command; its output streamed as printed (background: its record at once)",
                _ref(protocol.CommandRequest),
                {"200": NDJSON},
            ),
        },
        "/commands/connect": _post(
            "reattach to a command's output, from its start or from now",
            _ref(protocol.CommandConnectRequest),
            {"200": NDJSON, "404": _error("no such command")},
        ),
        "/commands/stdin": _post(
            "write to a command's stdin",
            _ref(protocol.CommandStdinRequest),
            {"200": _json(), "404": _error("no such command"), "409": _error("it takes no input")},
        ),
        "/commands/kill": _post(
            "kill a command and what it started",
            _ref(protocol.CommandIdRequest),
            {"200": _json(), "404": _error("no such command")},
        ),
        "/files/list": _post(
            "a workspace directory's entries",
            _ref(protocol.FilePathRequest),
            {"200": _json(), "404": _error("no such directory")},
        ),
        "/files/stat": _post(
            "whether a workspace path exists", _ref(protocol.FilePathRequest), {"200": _json()}
        ),
        "/files/remove": _post(
            "remove a file, a symlink or (recursive) a directory",
            _ref(protocol.FilePathRequest),
            {"200": _json(), "404": _error("no such entry"), "409": _error("a directory that is not empty")},
        ),
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "ToolServer node", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "nodeSecret": {"type": "apiKey", "in": "header", "name": protocol.SECRET_HEADER}
            },
        },
        "security": [{"nodeSecret": []}],
    }
