"""A session's workspace files as MCP resources, over both transports."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable

import pytest
from mcp import Client, MCPError, types

SETUP = (
    "mkdir -p notes && printf 'buy milk\\n' > notes/todo.txt"
    " && head -c 4096 /dev/urandom > blob.bin && sha256sum blob.bin"
    " && head -c 11000000 /dev/zero > big.log"
)


async def test_workspace_files_are_resources(connect: Callable[[], Client]) -> None:
    async with connect() as client:
        made = await client.call_tool("shell_command_executor", {"command": SETUP})
        digest = made.structured_content["output"].split()[0]

        listed = {r.uri: r for r in (await client.list_resources()).resources}
        assert {"workspace:///notes/todo.txt", "workspace:///blob.bin", "workspace:///big.log"} <= set(listed)
        assert listed["workspace:///notes/todo.txt"].size == 9
        templates = (await client.list_resource_templates()).resource_templates
        assert [t.uri_template for t in templates] == ["workspace:///{path}"]

        (text,) = (await client.read_resource("workspace:///notes/todo.txt")).contents
        assert isinstance(text, types.TextResourceContents)
        assert (text.text, text.mime_type) == ("buy milk\n", "text/plain")

        (blob,) = (await client.read_resource("workspace:///blob.bin")).contents
        assert isinstance(blob, types.BlobResourceContents)
        assert hashlib.sha256(base64.b64decode(blob.blob)).hexdigest() == digest

        with pytest.raises(MCPError, match=r"above the 10485760-byte limit .*mcp\.resource_max_bytes"):
            await client.read_resource("workspace:///big.log")
        with pytest.raises(MCPError, match="not found"):
            await client.read_resource("workspace:///missing.txt")
        with pytest.raises(MCPError, match=r"outside the workspace|escapes"):
            await client.read_resource("workspace:///../../etc/passwd")
        with pytest.raises(MCPError, match="not a workspace file"):
            await client.read_resource("file:///etc/passwd")
