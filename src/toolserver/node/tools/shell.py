"""shell_command_executor: bash in the workspace, in the foreground (with a timeout) or in the background.

Every command runs in its own session (process group), so a timeout, ``kill`` or the node's shutdown
ends the command together with everything it started. Output (stdout and stderr merged) is kept in
a bounded buffer: only its most recent part is returned when a command prints a lot.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from typing import Any

from toolserver.errors import ToolArgumentError, ToolError, ToolTimeout
from toolserver.node.context import NodeContext
from toolserver.node.registry import tool

#: longest run_async (or sending input) waits for output before answering
_ASYNC_FIRST_WAIT = 1.0
_MAX_JOBS = 64


class OutputBuffer:
    """Keeps the last ``cap`` bytes of a stream and remembers how much came before."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.data = bytearray()
        self.start = 0  # absolute offset of data[0]
        self.total = 0

    def feed(self, chunk: bytes) -> None:
        self.data += chunk
        self.total += len(chunk)
        if len(self.data) > self.cap:
            drop = len(self.data) - self.cap
            del self.data[:drop]
            self.start += drop

    def read_from(self, pos: int) -> tuple[str, int]:
        """Text written since ``pos`` (with a note when part of it was dropped) and the new position."""
        note = ""
        if pos < self.start:
            note = f"[... {self.start - pos} bytes of earlier output omitted ...]\n"
            pos = self.start
        text = bytes(self.data[pos - self.start :]).decode("utf-8", errors="replace")
        return note + text, self.total


class ShellJob:
    def __init__(self, job_id: int, command: str, proc: asyncio.subprocess.Process, cap: int) -> None:
        self.id = job_id
        self.command = command
        self.proc = proc
        self.buffer = OutputBuffer(cap)
        self.read_pos = 0
        self.killed = False
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := await self.proc.stdout.read(65536):
            self.buffer.feed(chunk)

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    def take_output(self) -> str:
        text, self.read_pos = self.buffer.read_from(self.read_pos)
        return text


class ShellManager:
    """The commands of one node: foreground ones while they run, background ones until read or killed."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.jobs: dict[int, ShellJob] = {}
        self.groups: set[int] = set()
        self._next_id = 0

    async def start(self, command: str, interactive: bool) -> ShellJob:
        if len(self.jobs) >= _MAX_JOBS:
            raise ToolError(f"too many shells ({_MAX_JOBS}) are open; kill some with kill=true first")
        proc = await asyncio.create_subprocess_exec(
            self.ctx.config.shell_executable,
            "-c",
            command,
            stdin=asyncio.subprocess.PIPE if interactive else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=self.ctx.workspace,
            env=self.ctx.child_env,
            start_new_session=True,
        )
        self.groups.add(proc.pid)
        job = ShellJob(self._next_id, command, proc, cap=self.ctx.config.max_output_chars)
        self.jobs[job.id] = job
        self._next_id += 1
        return job

    def get(self, shell_id: int) -> ShellJob:
        job = self.jobs.get(shell_id)
        if job is None:
            raise ToolError(
                f"no shell with shell_id={shell_id}: it never existed, was killed, "
                "or finished and was read already"
            )
        return job

    async def wait(self, job: ShellJob, seconds: float) -> bool:
        """Wait up to ``seconds`` for the command to end; True when it has (output drained)."""
        try:
            await asyncio.wait_for(asyncio.shield(job.proc.wait()), seconds)
        except TimeoutError:
            return False
        # a background child may keep the pipe open: do not wait for it forever
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(job.reader), 0.5)
        return True

    async def settle(self, job: ShellJob, seconds: float) -> None:
        """Wait until the command prints something new (then a moment more) or ends, at most ``seconds``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while job.running and job.buffer.total <= job.read_pos and loop.time() < deadline:
            await asyncio.sleep(0.02)
        await self.wait(job, min(0.1, max(0.0, deadline - loop.time())))

    async def kill(self, job: ShellJob, grace: float = 1.0) -> None:
        """SIGTERM the command's process group, SIGKILL it after ``grace`` seconds."""
        job.killed = True
        _signal_group(job.proc.pid, signal.SIGTERM)
        exited = await self.wait(job, grace)
        # also whatever in the group ignored SIGTERM or outlived bash
        _signal_group(job.proc.pid, signal.SIGKILL)
        if not exited:
            await self.wait(job, 2.0)

    def forget(self, job: ShellJob) -> None:
        self.jobs.pop(job.id, None)
        if not job.reader.done():
            job.reader.cancel()

    def report(self, job: ShellJob) -> dict[str, Any]:
        result: dict[str, Any] = {"shell_id": job.id, "output": job.take_output()}
        if job.running:
            result["status"] = "running"
        else:
            result["status"] = "killed" if job.killed else "exited"
            result["returncode"] = job.proc.returncode
            if job.read_pos >= job.buffer.total:
                self.forget(job)
        return result

    async def aclose(self) -> None:
        """Kill every process group ever started (background children included), at once."""
        for pgid in self.groups:
            _signal_group(pgid, signal.SIGKILL)
        for job in list(self.jobs.values()):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(job.proc.wait(), 1.0)
            self.forget(job)
        self.groups.clear()


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@tool
async def shell_command_executor(
    ctx: NodeContext,
    command: str = "",
    run_async: bool = False,
    shell_id: int | None = None,
    kill: bool = False,
    timeout: float | None = None,  # noqa: ASYNC109 - the tool's own argument
) -> dict[str, Any]:
    """Run a bash command in the workspace and return its output (stdout and stderr together) and return code.

    Use it to run programs, install packages, list or move files. Avoid commands that wait for user input.
    A command that runs past the timeout keeps running in the background: the answer (status 450) gives
    its shell_id. Set run_async=true for long jobs (servers, big installs): you get a shell_id at once.
    Call again with shell_id to read the new output of a background command (and its return code once it
    has ended), with shell_id and command to send that text to its standard input, or with shell_id and
    kill=true to stop it. Only the last part of very long outputs is kept.

    Args:
        command: The bash command line to run (or, with shell_id, text sent to the background
            command's input).
        run_async: Start the command in the background and return its shell_id right away.
        shell_id: Id of a background command, to read its output, send it input or kill it.
        kill: With shell_id: stop that command (and everything it started).
        timeout: Seconds to wait: for a new command, before it is moved to the background (default from the
            node config); with shell_id, how long to wait for the command to end before answering.
    """
    manager: ShellManager = ctx.service("shell", ShellManager)
    if timeout is not None and timeout <= 0:
        raise ToolArgumentError("argument 'timeout': must be more than 0 seconds")
    if shell_id is not None:
        job = manager.get(shell_id)
        if command:
            if job.proc.stdin is None:
                raise ToolError(f"shell {shell_id} was not started with run_async=true: it takes no input")
            if not job.running:
                raise ToolError(f"shell {shell_id} has already ended; it takes no more input")
            text = command if command.endswith("\n") else command + "\n"
            job.proc.stdin.write(text.encode())
            with contextlib.suppress(ConnectionError):
                await job.proc.stdin.drain()
        if kill:
            await manager.kill(job)
        else:
            await manager.wait(
                job, timeout if timeout is not None else (_ASYNC_FIRST_WAIT if command else 0.05)
            )
        return manager.report(job)

    if kill:
        raise ToolArgumentError("kill=true needs the shell_id of the command to stop")
    if not command.strip():
        raise ToolArgumentError("argument 'command': give a command to run (or a shell_id)")
    job = await manager.start(command, interactive=run_async)
    if run_async:
        await manager.settle(job, _ASYNC_FIRST_WAIT)
        return manager.report(job)
    limit = timeout if timeout is not None else ctx.config.shell_timeout
    try:
        finished = await manager.wait(job, limit)
    except asyncio.CancelledError:
        _signal_group(job.proc.pid, signal.SIGKILL)
        manager.forget(job)
        raise
    if not finished:
        output = job.take_output()
        raise ToolTimeout(
            f"the command is still running after {limit:g} s; it goes on in the background as "
            f"shell_id={job.id}. Call shell_command_executor with shell_id={job.id} to read its output, "
            "or with kill=true to stop it.",
            partial={"shell_id": job.id, "status": "running", "output": output},
        )
    output = job.take_output()
    manager.forget(job)
    return {"returncode": job.proc.returncode, "output": output}
