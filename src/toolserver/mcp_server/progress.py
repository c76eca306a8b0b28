"""Progress of a shell command while the shell tool runs it: the output the node streams.

A ``tools/call`` of ``shell_command_executor`` that carries a progress token (and just runs a
command: ``command``, maybe ``timeout``) still goes through ``/execute_tool``, so its result,
timeout and cancellation are the tool's own. Beside it, the node's ``/commands`` routes (one id
space with the tool's jobs) find the new job and stream its output, and every chunk becomes a
progress notification: ``progress`` counts the characters printed so far, ``message`` is the
chunk (its last :data:`MESSAGE_CHARS` characters). A node without ``/commands`` gives no progress.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from toolserver.mcp_server.sandbox import NodeAnswer, Sandbox

SHELL_TOOL = "shell_command_executor"
#: Arguments of a plain run (no background job, no shell_id to read, send input to or kill).
PLAIN_RUN = frozenset({"command", "timeout"})
MESSAGE_CHARS = 2000
#: How long to look for the tool's job among the node's commands, and how often.
FIND_SECONDS = 10.0
FIND_EVERY = 0.02

Report = Callable[[float, str], Awaitable[None]]


def streams_output(name: str, arguments: dict[str, Any]) -> bool:
    """Whether a call of tool ``name`` with ``arguments`` runs one command whose output can stream."""
    command = arguments.get("command")
    return (
        name == SHELL_TOOL
        and set(arguments) <= PLAIN_RUN
        and isinstance(command, str)
        and bool(command.strip())
    )


async def call_with_progress(sandbox: Sandbox, payload: dict[str, Any], report: Report) -> NodeAnswer:
    """Run the shell tool through ``/execute_tool``, reporting its command's output as it is printed."""
    before = await _command_ids(sandbox)
    if before is None:
        return await sandbox.post("/execute_tool", payload)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(_follow, sandbox, payload["arguments"]["command"], before, report)
        answer = await sandbox.post("/execute_tool", payload)
        tasks.cancel_scope.cancel()  # the result is in: no more progress
    return answer


async def _command_ids(sandbox: Sandbox) -> set[int] | None:
    answer = await sandbox.get("/commands")
    if answer.status != 200 or not isinstance(answer.body, dict):
        return None
    return {c.get("id") for c in answer.body.get("commands", []) if isinstance(c, dict)}


async def _follow(sandbox: Sandbox, command: str, before: set[int], report: Report) -> None:
    job_id = None
    with anyio.move_on_after(FIND_SECONDS):
        while job_id is None:
            answer = await sandbox.get("/commands")
            if answer.status != 200 or not isinstance(answer.body, dict):
                return
            new = [
                c["id"]
                for c in answer.body.get("commands", [])
                if isinstance(c, dict) and c.get("id") not in before and c.get("command") == command
            ]
            if new:
                job_id = min(new)
            else:
                await anyio.sleep(FIND_EVERY)
    if job_id is None:
        return
    printed = 0
    async with sandbox.open("/commands/connect", {"id": job_id, "from": "start", "follow": True}) as stream:
        if stream.status != 200:
            return
        pending = b""
        async for chunk in stream.chunks():
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("type") in ("stdout", "stderr") and isinstance(event.get("data"), str):
                    printed += len(event["data"])
                    await report(printed, event["data"][-MESSAGE_CHARS:])
                elif event.get("type") in ("exit", "detached"):
                    return
