"""Every session's tools over the Model Context Protocol, on the official ``mcp`` SDK.

* :mod:`.sandbox` — what the MCP layer needs from a session's node (:class:`~.sandbox.Sandbox`);
* :mod:`.results` — node answers as MCP tools, tool results and resources;
* :mod:`.server` — the SDK's low-level ``Server`` with the tools and resource handlers;
* :mod:`.progress` — a shell command's output as progress notifications;
* :mod:`.stdio` — ``toolserver mcp``: a stdio server that forwards to a manager.

The manager's ``/mcp`` endpoint (Streamable HTTP) lives in :mod:`toolserver.manager.mcp_http`.
"""
