"""The node's HTTP API as XAgent's client uses it: listing, schemas, retrieval, execution, errors."""

from __future__ import annotations

import base64
import concurrent.futures
import time

import requests

from .conftest import Node


def test_health_needs_no_secret_but_everything_else_does(node: Node) -> None:
    assert requests.get(f"{node.url}/health", timeout=5).json() == {"status": "ok"}
    for method, path in [
        ("GET", "/"),
        ("POST", "/"),
        ("POST", "/get_available_tools"),
        ("POST", "/execute_tool"),
    ]:
        bare = requests.request(method, f"{node.url}{path}", timeout=5)
        assert bare.status_code == 401, path
        assert "X-ToolServer-Node-Secret" in bare.json()["detail"]
    wrong = requests.post(
        f"{node.url}/get_available_tools", headers={"X-ToolServer-Node-Secret": "nope"}, timeout=5
    )
    assert wrong.status_code == 401
    assert "wrong" in wrong.json()["detail"]


def test_greeting_reports_failed_extensions(node: Node) -> None:
    for method in ("GET", "POST"):
        body = node.client.request(method, node.url + "/", timeout=5).json()
        assert body["tools"] >= 9
        sources = " ".join(e["source"] for e in body["load_errors"])
        errors = " ".join(e["error"] for e in body["load_errors"])
        assert "broken_ext.py" in sources and "broken on purpose" in errors
        assert "no_such_module_anywhere" in sources


def test_available_tools_lists_builtins_envs_and_extensions(node: Node) -> None:
    body = node.post("/get_available_tools").json()
    names = body["available_tools"]
    for expected in [
        "FileSystemEnv_print_filesys_struture",
        "FileSystemEnv_read_from_file",
        "FileSystemEnv_write_to_file",
        "shell_command_executor",
        "PythonNotebook_execute_cell",
        "PythonNotebook_print_notebook",
        "WebEnv_browse_website",
        "WebEnv_search_and_browse",
        "calculator",
        "echo_args",
        "Counter_bump",
    ]:
        assert expected in names
    assert "zebra_stripe_counter" not in names  # hidden
    assert [t["name"] for t in body["tools_json"]] == names
    envs = {e["name"]: e for e in body["available_envs"]}
    assert envs["FileSystemEnv"]["tools"] == ["print_filesys_struture", "read_from_file", "write_to_file"]
    assert envs["Counter"]["description"] == "Counts calls."


def test_schema_comes_from_hints_and_docstrings(node: Node) -> None:
    body = node.post(
        "/get_json_schema_for_tools", json={"tool_names": ["echo_args", "where_am_i", "nope"]}
    ).json()
    assert body["missing_tools"] == ["nope"]
    echo, where = body["tools_json"]
    assert echo["description"] == "Return the arguments it got, as a dict."
    params = echo["parameters"]
    assert params["type"] == "object"
    assert params["required"] == ["count"]
    assert params["properties"]["count"] == {
        "description": "How many items.",
        "minimum": 0,
        "type": "integer",
    }
    assert params["properties"]["mode"]["enum"] == ["a", "b"]
    # the context parameter is injected, never part of the schema
    assert list(where["parameters"]["properties"]) == ["suffix"]
    read = node.post(
        "/get_json_schema_for_tools", json={"tool_names": ["FileSystemEnv_read_from_file"]}
    ).json()
    props = read["tools_json"][0]["parameters"]["properties"]
    assert "relative to the workspace root" in props["filepath"]["description"]


def test_schema_for_envs(node: Node) -> None:
    body = node.post("/get_json_schema_for_envs", json={"env_names": ["PythonNotebook", "Nope"]}).json()
    assert body["missing_envs"] == ["Nope"]
    assert body["envs_json"][0]["tools"] == ["execute_cell", "print_notebook"]


def test_retrieval_ranks_relevant_tools_first(node: Node) -> None:
    def top(question: str, k: int = 3) -> list[str]:
        body = node.post("/retrieving_tools", json={"question": question, "top_k": k}).json()
        assert [t["name"] for t in body["tools_json"]] == body["retrieved_tools"]
        return body["retrieved_tools"]

    assert top("evaluate an arithmetic expression like 2 + 3 * 4")[0] == "calculator"
    assert top("run python code in a jupyter notebook cell")[0] == "PythonNotebook_execute_cell"
    assert "FileSystemEnv_read_from_file" in top("read the lines of a text file")
    assert top("open a web page url and read its text")[0] == "WebEnv_browse_website"
    # hidden tools are not listed, but retrieval finds them
    assert top("how many stripes do zebras have", 1) == ["zebra_stripe_counter"]
    assert len(top("anything at all", 7)) == 7
    bad = node.post("/retrieving_tools", json={"question": "x", "top_k": 0})
    assert bad.status_code == 422


def test_execute_plain_and_wrapped_results(node: Node) -> None:
    assert node.ok("calculator", expression="6*7") == 42
    # dicts travel wrapped as 'simple' (XAgent's client unwraps them)
    assert node.run("echo_args", count=2).json() == {"type": "simple", "data": {"count": 2, "mode": "a"}}
    mixed = node.run("mixed_outputs").json()
    assert mixed["type"] == "composite"
    assert mixed["data"][0] == "some text"
    image = mixed["data"][1]
    assert image["type"] == "binary" and image["media_type"] == "image/png" and image["name"] == "dot.png"
    assert base64.b64decode(image["data"]) == b"\x89PNG fake"
    raw = node.run("raw_bytes").json()
    assert raw["type"] == "binary" and base64.b64decode(raw["data"]) == b"\x00\x01\x02"


def test_env_tools_keep_state_and_accept_env_name(node: Node) -> None:
    first = node.ok("Counter_bump", by=2)
    second = node.post(
        "/execute_tool", json={"tool_name": "bump", "env_name": "Counter", "arguments": {}}
    ).json()
    assert second == first + 1
    missing = node.post("/execute_tool", json={"tool_name": "nope", "env_name": "Counter", "arguments": {}})
    assert missing.status_code == 404


def test_arguments_may_arrive_as_json_string(node: Node) -> None:
    response = node.post(
        "/execute_tool", json={"tool_name": "calculator", "arguments": '{"expression": "1+1"}'}
    )
    assert response.status_code == 200 and response.json() == 2
    empty = node.post(
        "/execute_tool", json={"tool_name": "FileSystemEnv_print_filesys_struture", "arguments": ""}
    )
    assert empty.status_code == 200
    null = node.post(
        "/execute_tool", json={"tool_name": "FileSystemEnv_print_filesys_struture", "arguments": None}
    )
    assert null.status_code == 200
    bad = node.post("/execute_tool", json={"tool_name": "calculator", "arguments": "{not json"})
    assert bad.status_code == 422 and "not valid JSON" in bad.json()["detail"]
    not_object = node.post("/execute_tool", json={"tool_name": "calculator", "arguments": "[1, 2]"})
    assert not_object.status_code == 422


def test_error_statuses(node: Node) -> None:
    unknown = node.run("calculater", expression="1")
    assert unknown.status_code == 404
    assert "calculator" in unknown.json()["detail"]  # a suggestion
    missing = node.run("echo_args")
    assert missing.status_code == 422 and "'count'" in missing.json()["detail"]
    wrong_type = node.run("echo_args", count="many")
    assert wrong_type.status_code == 422 and "'count'" in wrong_type.json()["detail"]
    out_of_range = node.run("echo_args", count=-1)
    assert out_of_range.status_code == 422
    extra = node.run("echo_args", count=1, colour="red")
    assert extra.status_code == 422 and "unexpected argument 'colour'" in extra.json()["detail"]
    failed = node.run("explode")
    assert failed.status_code == 500 and "boom from the tool" in failed.json()["detail"]


def test_malformed_requests_get_4xx(node: Node) -> None:
    for body in (b"{not json", b"\xff\xfe", b"[1, 2]", b'"text"'):
        response = node.post("/execute_tool", data=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, body
        assert response.json()["detail"]
    no_name = node.post("/execute_tool", json={"arguments": {}})
    assert no_name.status_code == 422 and "tool_name" in no_name.json()["detail"]
    assert node.post("/get_json_schema_for_tools", json={"tool_names": "x"}).status_code == 422
    assert node.post("/download_file", json={}).status_code == 422
    assert node.client.get(f"{node.url}/execute_tool", timeout=5).status_code == 405
    assert node.post("/no_such_endpoint").status_code == 404


def test_a_tool_cannot_bring_the_node_down(node: Node) -> None:
    response = node.run("exit_process")
    assert response.status_code == 500 and "SystemExit" in response.json()["detail"]
    assert node.ok("calculator", expression="1+2") == 3


def test_context_is_injected(node: Node) -> None:
    assert node.ok("where_am_i", suffix="/x") == str(node.workspace.resolve()) + "/x"


def test_sync_tools_do_not_block_the_event_loop(node: Node) -> None:
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        slow = pool.submit(node.run, "blocking_sleep", seconds=1.5)
        time.sleep(0.2)
        started = time.monotonic()
        assert node.ok("calculator", expression="2+2") == 4
        assert time.monotonic() - started < 0.7
        assert slow.result().json() == "slept"


def test_every_route_but_health_needs_the_secret(node: Node) -> None:
    from toolserver.node.app import create_app
    from toolserver.node.settings import NodeConfig

    app = create_app(NodeConfig(workspace=node.tmp / "route-table-ws"))
    open_routes = []
    for route in app.routes:
        methods = sorted(getattr(route, "methods", None) or ["GET"])
        for method in methods:
            answer = requests.request(method, f"{node.url}{route.path}", timeout=10)
            if answer.status_code != 401:
                open_routes.append((method, route.path, answer.status_code))
    assert open_routes == [("GET", "/health", 200), ("HEAD", "/health", 200)]
