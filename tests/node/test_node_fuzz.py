"""The node's OpenAPI document fuzzed with schemathesis against a real node process on loopback.

The document is the node's own (every tool's parameter schema included). Two kinds of tool are
held back: the web tools (a generated URL would leave the machine) and free-form code, which is
replaced by a few harmless shell commands and notebook cells, so that the fuzzer still drives
every other argument (timeouts, shell ids, cell indexes, paths, ...).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig

from tests.support import check_fuzzed_answer, fuzz_settings

from .conftest import SECRET, Node

pytestmark = pytest.mark.slow

SAFE = {
    "shell_command_executor": {"command": ["true", "echo fuzz", "sleep 0.2", "cat", "ls -la", ""]},
    "PythonNotebook_execute_cell": {"code": ["1 + 1", "x = 41", "print(x + 1)", "raise ValueError('x')"]},
}
CONSTANT = {"PythonNotebook_execute_cell": {"reset": False}}
CONFIG = {"shell_timeout": 5, "notebook_timeout": 5, "tool_timeout": 20, "upload_max_bytes": 1 << 20}


def _fuzzable(document: dict[str, Any]) -> dict[str, Any]:
    document = copy.deepcopy(document)
    body = document["paths"]["/execute_tool"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    variants = []
    for variant in body["anyOf"]:
        name = variant.get("properties", {}).get("tool_name", {}).get("const")
        if name is None or name.startswith("WebEnv_"):
            continue  # the generic body would let any tool name through, web tools included
        arguments = variant["properties"]["arguments"]
        for arg, values in SAFE.get(name, {}).items():
            arguments["properties"][arg] = {"enum": values}
        for arg, value in CONSTANT.get(name, {}).items():
            arguments["properties"][arg] = {"const": value}
        variants.append(variant)
    body["anyOf"] = variants
    # /commands runs what it is given: harmless commands only, each with a time limit
    command = document["components"]["schemas"]["CommandRequest"]["properties"]
    command["command"] = {"enum": ["true", "echo fuzz", "sleep 0.2", "ls -la"]}
    command["timeout"] = {"const": 2}
    return document


def _schema() -> schemathesis.schemas.BaseSchema:
    """The node's document, built here from a node app so that pytest can list its operations."""
    from toolserver.node.app import create_app
    from toolserver.node.openapi import node_openapi
    from toolserver.node.settings import NodeConfig

    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(NodeConfig(workspace=Path(tmp) / "ws", **CONFIG))
        document = _fuzzable(node_openapi(app.state.registry))
    # valid bodies only: an invalid one may carry any tool name or shell command (and gets a 4xx
    # from the body check before any tool runs, which the manager's fuzzing covers at its layer)
    config = SchemathesisConfig.from_dict(
        {"generation": {"mode": "positive", "with-security-parameters": False}}
    )
    return schemathesis.openapi.from_dict(document, config=config)


schema = _schema()


@pytest.fixture(scope="module")
def fuzzed_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("node-fuzz")
    node = Node(tmp / "ws", CONFIG, tmp).start()
    try:
        yield node
        log = node.log.read_text(errors="replace")
        assert "Traceback" not in log, log[-4000:]
    finally:
        node.stop()


def test_the_document_is_the_one_served(fuzzed_node: Node) -> None:
    served = fuzzed_node.client.get(f"{fuzzed_node.url}/openapi.json", timeout=10).json()
    assert _fuzzable(served) == schema.raw_schema


def _tool_failure(response: Any) -> bool:
    """A 500 of /execute_tool is the tool's own error (XAgent's contract); an exception it did not
    expect (``tool X failed: SomeError: ...``) or a crash of the node is not."""
    detail = (
        str(response.json().get("detail", "")) if "json" in response.headers.get("content-type", "") else ""
    )
    return (
        response.status_code == 500 and " failed: " not in detail and not detail.startswith("internal error")
    )


@schema.parametrize()
@fuzz_settings(25)
def test_the_node_api_fuzzed(case: schemathesis.Case, fuzzed_node: Node) -> None:
    response = case.call(base_url=fuzzed_node.url, headers={"X-ToolServer-Node-Secret": SECRET}, timeout=60)
    check_fuzzed_answer(case, response, may_fail=_tool_failure if case.path == "/execute_tool" else None)


@schema.include(path="/execute_tool").parametrize()
@fuzz_settings(100)
def test_the_tools_fuzzed(case: schemathesis.Case, fuzzed_node: Node) -> None:
    """More examples for /execute_tool: one body per tool, so each tool gets a share."""
    response = case.call(base_url=fuzzed_node.url, headers={"X-ToolServer-Node-Secret": SECRET}, timeout=60)
    check_fuzzed_answer(case, response, may_fail=_tool_failure)
