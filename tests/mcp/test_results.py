"""The mapping of node answers to MCP results, on the wire shapes the node produces."""

from __future__ import annotations

import base64

from mcp import types

from toolserver.mcp_server.results import file_uri, tool_result, uri_path
from toolserver.mcp_server.sandbox import GONE, NodeAnswer
from toolserver.node.results import Binary, Composite, wrap_result


def _ok(value: object) -> types.CallToolResult:
    return tool_result(NodeAnswer(200, wrap_result(value)))


def test_binary_results_keep_their_media_type() -> None:
    png, wav, pdf = b"\x89PNG fake", b"RIFF fake", b"%PDF fake"
    result = _ok(
        Composite(
            [
                "two files:",
                Binary(png, "image/png", "plot.png"),
                Binary(wav, "audio/wav", "a.wav"),
                Binary(pdf, "application/pdf", "r.pdf"),
            ]
        )
    )
    text, image, audio, embedded = result.content
    assert isinstance(text, types.TextContent) and text.text == "two files:"
    assert isinstance(image, types.ImageContent) and image.mime_type == "image/png"
    assert base64.b64decode(image.data) == png
    assert isinstance(audio, types.AudioContent) and audio.mime_type == "audio/wav"
    assert isinstance(embedded, types.EmbeddedResource)
    assert (
        embedded.resource.mime_type == "application/pdf" and str(embedded.resource.uri) == "result:///r.pdf"
    )
    assert base64.b64decode(embedded.resource.blob) == pdf


def test_json_values_become_text_and_objects_structured_content() -> None:
    assert _ok(None).content[0].text == "null"
    assert _ok([1, "a"]).content[0].text.replace("\n", "").replace(" ", "") == '[1,"a"]'
    result = _ok({"returncode": 0, "output": "hi"})
    assert result.structured_content == {"returncode": 0, "output": "hi"}
    assert '"output": "hi"' in result.content[0].text


def test_error_answers_are_tool_errors_with_the_message() -> None:
    for status, detail in ((500, "tool x failed: boom"), (422, "invalid arguments: missing 'a'")):
        result = tool_result(NodeAnswer(status, {"detail": detail}))
        assert result.is_error and result.content[0].text == detail
    gone = tool_result(NodeAnswer(403, {"detail": GONE}))
    assert gone.is_error and "start a new MCP session" in gone.content[0].text
    down = tool_result(NodeAnswer(504, {"detail": "node did not answer within 600 s"}))
    assert down.is_error and down.content[0].text == "504: node did not answer within 600 s"


def test_workspace_uris_round_trip() -> None:
    assert file_uri("dir with space/ä.txt") == "workspace:///dir%20with%20space/%C3%A4.txt"
    assert uri_path(file_uri("dir with space/ä.txt")) == "dir with space/ä.txt"
