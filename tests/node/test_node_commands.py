"""The /commands routes against real bash: output streamed as printed, tagged by stream; background
commands listed, reattached to, written to and killed; bad requests answered clearly."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import requests

from tests.support import sleeping, wait_until

from .conftest import Node


def events(response: requests.Response) -> Iterator[dict[str, Any]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/x-ndjson")
    for line in response.iter_lines():
        if line:
            yield json.loads(line)


def start(node: Node, **body: Any) -> requests.Response:
    return node.post("/commands", json=body, stream=True)


def until(stream: Iterator[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The events up to and including the first of type ``kind`` (keepalives left out)."""
    seen = []
    for event in stream:
        if event["type"] != "keepalive":
            seen.append(event)
        if event["type"] == kind:
            return seen
    raise AssertionError(f"the stream ended before a {kind!r} event: {seen}")


def test_output_streams_as_printed_tagged_by_stream_then_the_exit(node: Node) -> None:
    # the command waits for input after printing: what arrives before it gets any was streamed
    response = start(node, command="echo ready; echo oops >&2; read name; echo got $name; exit 3", stdin=True)
    stream = events(response)
    first = next(stream)
    assert first["type"] == "start" and first["command"].startswith("echo ready")
    seen: dict[str, str] = {"stdout": "", "stderr": ""}
    for event in stream:
        if event["type"] in seen:
            seen[event["type"]] += event["data"]
        if seen == {"stdout": "ready\n", "stderr": "oops\n"}:
            break
    answer = node.post("/commands/stdin", json={"id": first["id"], "data": "otter\n"})
    assert answer.status_code == 200 and answer.json()["written"] == 6
    rest = until(stream, "exit")
    assert [e for e in rest if e["type"] == "stdout"] == [{"type": "stdout", "data": "got otter\n"}]
    assert rest[-1] == {"type": "exit", "exit_code": 3, "status": "exited"}
    # a foreground command is gone once its stream has ended
    assert node.post("/commands/kill", json={"id": first["id"]}).status_code == 404


def test_a_timeout_kills_the_command_and_everything_it_started(node: Node) -> None:
    response = start(node, command="sleep 4711 & sleep 4712; echo never", timeout=0.5)
    stream = events(response)
    wait_until(lambda: len(sleeping("4711", "4712")) == 2, what="both sleeps")
    assert until(stream, "exit")[-1]["status"] == "timeout"
    assert sleeping("4711", "4712") == []


def test_background_commands_are_listed_reattached_to_and_killed(node: Node) -> None:
    body = {"command": "echo one; read; echo two; read; echo three", "background": True, "stdin": True}
    started = node.post("/commands", json=body).json()
    command_id = started["id"]
    assert started["status"] == "running" and started["background"] is True
    listed = {c["id"]: c for c in node.client.get(f"{node.url}/commands").json()["commands"]}
    assert listed[command_id]["status"] == "running" and listed[command_id]["exit_code"] is None

    # the output so far, without waiting for more
    def so_far() -> list[dict[str, Any]]:
        body = {"id": command_id, "follow": False}
        return until(events(node.post("/commands/connect", json=body, stream=True)), "detached")

    snapshot = wait_until(lambda: next((s for s in [so_far()] if len(s) == 3), None), what="'one'")
    assert snapshot[1:] == [{"type": "stdout", "data": "one\n"}, {"type": "detached", "status": "running"}]

    # from now: only what is printed after attaching
    live = events(node.post("/commands/connect", json={"id": command_id, "from": "now"}, stream=True))
    assert next(live)["type"] == "start"
    node.post("/commands/stdin", json={"id": command_id, "data": "\n"})
    assert next(e for e in live if e["type"] == "stdout") == {"type": "stdout", "data": "two\n"}
    node.post("/commands/stdin", json={"id": command_id, "data": "\n", "eof": True})
    assert until(live, "exit")[-1] == {"type": "exit", "exit_code": 0, "status": "exited"}

    # from the start, after it ended: everything, then how it ended
    replay = until(events(node.post("/commands/connect", json={"id": command_id}, stream=True)), "exit")
    assert "".join(e["data"] for e in replay if e["type"] == "stdout") == "one\ntwo\nthree\n"

    sleeper = node.post("/commands", json={"command": "sleep 4720", "background": True}).json()
    wait_until(lambda: sleeping("4720"), what="the sleep")
    killed = node.post("/commands/kill", json={"id": sleeper["id"]}).json()
    assert killed["status"] == "killed" and killed["exit_code"] is not None
    assert sleeping("4720") == []


def test_a_foreground_command_dies_with_its_client(node: Node) -> None:
    response = start(node, command="sleep 4730")
    stream = events(response)  # (a generator dropped here would close the response already)
    assert next(stream)["type"] == "start"
    wait_until(lambda: sleeping("4730"), what="the sleep")
    response.close()
    wait_until(lambda: not sleeping("4730"), timeout=10, what="the command to be killed")


def test_only_the_last_part_is_kept_and_quiet_streams_keep_alive(node: Node) -> None:
    # the shared node keeps 2000 characters per command and sends keepalives after 0.5 s
    done = node.post("/commands", json={"command": "seq 1 3000; sleep 1.2; echo end", "background": True})
    command_id = done.json()["id"]
    printed = sum(len(f"{i}\n") for i in range(1, 3001))

    def chars() -> int:
        listed = node.client.get(f"{node.url}/commands").json()["commands"]
        return next(c["output_chars"] for c in listed if c["id"] == command_id)

    wait_until(lambda: chars() == printed, what="seq's output")
    live = events(node.post("/commands/connect", json={"id": command_id, "from": "now"}, stream=True))
    kinds = []
    for event in live:
        kinds.append(event["type"])
        if event["type"] == "exit":
            break
    assert kinds[0] == "start" and kinds[-2:] == ["stdout", "exit"]  # 'end'
    assert "keepalive" in kinds  # during the quiet second
    replay = until(events(node.post("/commands/connect", json={"id": command_id}, stream=True)), "exit")
    assert replay[1]["type"] == "dropped" and replay[1]["chars"] > 10_000
    text = "".join(e["data"] for e in replay if e["type"] == "stdout")
    assert len(text) <= 2000 and text.endswith("3000\nend\n")


def test_the_shell_tools_background_jobs_are_commands_too(node: Node) -> None:
    shell_id = node.ok("shell_command_executor", command="echo from the tool; sleep 0.3", run_async=True)[
        "shell_id"
    ]
    replay = until(events(node.post("/commands/connect", json={"id": shell_id}, stream=True)), "exit")
    assert [e["data"] for e in replay if e["type"] == "stdout"] == ["from the tool\n"]


def test_bad_requests_say_what_is_wrong(node: Node) -> None:
    def answer(path: str, body: Any) -> tuple[int, str]:
        response = node.post(path, json=body)
        return response.status_code, response.json()["detail"]

    assert answer("/commands", {})[0] == 422
    assert answer("/commands", {"command": "echo \x00"})[0] == 422
    assert answer("/commands", {"command": "true", "timeout": -1})[0] == 422
    assert answer("/commands", {"command": "true", "env": {"A=B": "x"}})[0] == 422
    status, detail = answer("/commands", {"command": "true", "cwd": "../.."})
    assert status == 400 and "outside the workspace" in detail
    status, detail = answer("/commands/connect", {"id": 987654})
    assert status == 404 and "GET /commands" in detail
    assert answer("/commands/connect", {"id": 1, "from": "yesterday"})[0] == 422
    assert answer("/commands/kill", {"id": 987654})[0] == 404
    no_stdin = node.post("/commands", json={"command": "sleep 5", "background": True}).json()["id"]
    status, detail = answer("/commands/stdin", {"id": no_stdin, "data": "x"})
    assert status == 409 and "stdin=true" in detail
    node.post("/commands/kill", json={"id": no_stdin})
    # the node keeps serving
    assert node.ok("calculator", expression="6*7") == 42


def test_commands_get_their_cwd_and_env(node: Node) -> None:
    (node.workspace / "sub").mkdir(exist_ok=True)
    body = {"command": 'pwd; echo "$GREETING"', "cwd": "sub", "env": {"GREETING": "hello otter"}}
    out = "".join(
        e.get("data", "") for e in until(events(start(node, **body)), "exit") if e["type"] == "stdout"
    )
    assert out == f"{(node.workspace / 'sub').resolve()}\nhello otter\n"
    started = time.monotonic()
    assert until(events(start(node, command="true")), "exit")[-1]["exit_code"] == 0
    assert time.monotonic() - started < 5
