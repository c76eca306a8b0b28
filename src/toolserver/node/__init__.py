"""The node: one session's sandboxed tool server (HTTP API, tool registry and builtin tools).

Heavy dependencies (jupyter_client, bs4, rank_bm25, httpx) are imported inside the tools that use
them, so a node answers ``GET /health`` quickly after its process starts.
"""
