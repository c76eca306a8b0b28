"""The MCP server of a session: the SDK's low-level ``Server`` over a :class:`Sandbox`.

Each handler asks ``resolve`` for the sandbox of the request's MCP session (the manager looks it
up by the ``Mcp-Session-Id`` header; the stdio server has just one). ``tools/list`` gives the
node's tools, ``tools/call`` runs one; ``resources/list`` and ``resources/read`` serve the
workspace's files. A call the client cancels is cancelled here, which closes the request to the
node, and the node then stops the tool (a shell command is killed, a notebook cell interrupted).
A shell command reports its output as progress (:mod:`.progress`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import mcp.types as types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.shared.exceptions import MCPError
from mcp.shared.jsonrpc_dispatcher import progress_token_from_params

from toolserver import __version__
from toolserver.errors import ResourceError
from toolserver.mcp_server.progress import call_with_progress, streams_output
from toolserver.mcp_server.results import (
    WORKSPACE_TEMPLATE,
    resource_contents,
    resources_from_tree,
    tool_result,
    tools_from_schemas,
    uri_path,
)
from toolserver.mcp_server.sandbox import Sandbox

SandboxResolver = Callable[[ServerRequestContext[Any, Any]], Awaitable[Sandbox]]

#: JSON-RPC code for a resource that cannot be read (the MCP specification's "Resource not found").
RESOURCE_NOT_FOUND = -32002
INSTRUCTIONS = (
    "A sandboxed tool server of your own for this session: a workspace directory, bash, a Python "
    "notebook that keeps its state, file and web tools. The workspace's files are resources "
    f"({WORKSPACE_TEMPLATE}). Everything stays in this session's sandbox until the session ends."
)


def build_server(resolve: SandboxResolver, resource_max_bytes: int) -> Server[Any]:
    """The MCP server whose handlers run on the sandbox ``resolve`` finds for each request."""

    async def list_tools(
        ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        answer = await (await resolve(ctx)).post("/get_available_tools", {})
        if answer.status != 200 or not isinstance(answer.body, dict):
            raise MCPError(types.INTERNAL_ERROR, f"the sandbox could not list its tools: {answer.detail}")
        return types.ListToolsResult(tools=tools_from_schemas(answer.body.get("tools_json") or []))

    async def call_tool(
        ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        sandbox = await resolve(ctx)
        arguments = params.arguments or {}
        payload = {"tool_name": params.name, "arguments": arguments}
        if progress_token_from_params(ctx.params) is not None and streams_output(params.name, arguments):

            async def report(printed: float, text: str) -> None:
                await ctx.session.report_progress(printed, None, text)

            return tool_result(await call_with_progress(sandbox, payload, report))
        return tool_result(await sandbox.post("/execute_tool", payload))

    async def list_resources(
        ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListResourcesResult:
        answer = await (await resolve(ctx)).post("/get_workspace_structure")
        if answer.status != 200 or not isinstance(answer.body, dict):
            raise MCPError(types.INTERNAL_ERROR, f"the sandbox could not list its files: {answer.detail}")
        return types.ListResourcesResult(resources=resources_from_tree(answer.body))

    async def list_templates(
        ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListResourceTemplatesResult:
        template = types.ResourceTemplate(
            name="workspace file",
            uri_template=WORKSPACE_TEMPLATE,
            description="a file of the session's workspace, by its path relative to the workspace",
        )
        return types.ListResourceTemplatesResult(resource_templates=[template])

    async def read_resource(
        ctx: ServerRequestContext[Any, Any], params: types.ReadResourceRequestParams
    ) -> types.ReadResourceResult:
        uri = str(params.uri)
        try:
            file = await (await resolve(ctx)).read_file(uri_path(uri), resource_max_bytes)
        except ResourceError as exc:
            raise MCPError(RESOURCE_NOT_FOUND, str(exc), {"uri": uri}) from None
        return types.ReadResourceResult(contents=[resource_contents(uri, file)])

    return Server(
        "toolserver",
        version=__version__,
        title="ToolServer",
        instructions=INSTRUCTIONS,
        on_list_tools=list_tools,
        on_call_tool=call_tool,
        on_list_resources=list_resources,
        on_list_resource_templates=list_templates,
        on_read_resource=read_resource,
    )
