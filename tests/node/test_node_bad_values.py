"""Values JSON can carry but no tool can use (NaN, Infinity, unpaired surrogates), a file that goes
away while it is downloaded, and the node's OpenAPI document."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import requests

from .conftest import SECRET, Node


def _raw(node: Node, path: str, body: str) -> requests.Response:
    return node.post(path, data=body.encode(), headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_a_shell_timeout_that_is_not_a_number_is_refused(node: Node, value: str) -> None:
    body = '{"tool_name": "shell_command_executor", "arguments": {"command": "echo hi", "timeout": %s}}'
    response = _raw(node, "/execute_tool", body % value)
    assert response.status_code == 400, response.text
    assert value.lstrip("-") in response.json()["detail"] and "finite number" in response.json()["detail"]
    # the same arguments as a JSON string are refused the same way
    response = node.post(
        "/execute_tool",
        json={"tool_name": "shell_command_executor", "arguments": '{"command": "echo", "timeout": NaN}'},
    )
    assert response.status_code == 422, response.text
    assert "still here" in str(node.ok("shell_command_executor", command="echo still here"))


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            "/execute_tool",
            '{"tool_name": "FileSystemEnv_read_from_file", "arguments": {"filepath": "\\ud800"}}',
        ),
        (
            "/execute_tool",
            '{"tool_name": "FileSystemEnv_write_to_file", '
            '"arguments": {"filepath": "a\\udfff.txt", "content": "x"}}',
        ),
        ("/download_file", '{"file_path": "\\ud800"}'),
        ("/get_json_schema_for_tools", '{"tool_names": ["\\udc80"]}'),
    ],
)
def test_an_unpaired_surrogate_is_refused_with_400(node: Node, path: str, body: str) -> None:
    logged = len(node.log.read_bytes())  # the node is shared: only what this test adds counts
    response = _raw(node, path, body)
    assert response.status_code == 400, response.text
    assert "unpaired" in response.json()["detail"]
    assert b"Traceback" not in node.log.read_bytes()[logged:]


def test_a_surrogate_pair_is_fine(node: Node) -> None:
    body = (
        '{"tool_name": "FileSystemEnv_write_to_file", '
        '"arguments": {"filepath": "\\ud83d\\ude00.txt", "content": "x"}}'
    )
    assert _raw(node, "/execute_tool", body).status_code == 200
    assert (node.workspace / "\N{GRINNING FACE}.txt").read_text().strip() == "x"


def test_a_file_replaced_or_removed_during_downloads_never_breaks_an_answer(make_node) -> None:  # type: ignore[no-untyped-def]
    node: Node = make_node()
    target = node.workspace / "moving.bin"
    versions = [os.urandom(300_000), os.urandom(200_000)]
    target.write_bytes(versions[0])
    stop = threading.Event()

    def churn() -> None:  # remove, then put back a file of another size, as fast as it goes
        i = 0
        while not stop.is_set():
            tmp = node.workspace / f".next-{i % 2}"
            tmp.write_bytes(versions[i % 2])
            target.unlink(missing_ok=True)
            os.replace(tmp, target)
            i += 1

    worker = threading.Thread(target=churn, daemon=True)
    worker.start()
    outcomes: dict[int, int] = {}
    try:
        for _ in range(300):
            response = node.post("/download_file", json={"file_path": "moving.bin"})
            outcomes[response.status_code] = outcomes.get(response.status_code, 0) + 1
            if response.status_code == 200:
                assert response.content in versions  # whole, one version or the other
            else:
                assert response.status_code == 404, response.text
    finally:
        stop.set()
        worker.join(10)
    assert outcomes.get(200, 0) > 0, outcomes
    assert "Traceback" not in node.log.read_text(errors="replace")


def test_the_openapi_document_is_behind_the_secret_and_lists_every_tool(node: Node) -> None:
    assert requests.get(f"{node.url}/openapi.json", timeout=10).status_code == 401
    doc = node.client.get(f"{node.url}/openapi.json", timeout=10).json()
    assert doc["openapi"].startswith("3.1")
    assert {"/execute_tool", "/upload_file", "/download_file", "/get_available_tools"} <= set(doc["paths"])
    variants = doc["paths"]["/execute_tool"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    names = {v["properties"]["tool_name"]["const"] for v in variants["anyOf"] if "properties" in v}
    tools = node.post("/get_available_tools", json={}).json()["available_tools"]
    assert set(tools) <= names
    assert doc["components"]["securitySchemes"]["nodeSecret"]["name"] == "X-ToolServer-Node-Secret"
    assert SECRET not in str(doc)


def test_write_to_a_path_not_valid_unicode_is_refused_by_the_path_check(tmp_path: Path) -> None:
    from toolserver.errors import WorkspacePathError
    from toolserver.node.context import resolve_in_workspace

    with pytest.raises(WorkspacePathError, match="not valid Unicode"):
        resolve_in_workspace(tmp_path, "dir/\udcff")
