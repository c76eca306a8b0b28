"""Commands in the workspace: the job machinery behind shell_command_executor and the /commands routes.

Every command runs in its own session (process group), so a timeout, ``kill`` or the node's shutdown
ends the command together with everything it started. Its output goes to an :class:`OutputLog`:
chunks tagged with their stream, of which only the most recent part is kept when a command prints a
lot. Every reader follows the log from a position of its own (the tool from ``read_pos``, each
stream of the /commands routes from where it attached), so a slow reader never makes the node hold
more than the log's cap.

The tool merges stderr into stdout (one pipe, as XAgent expects); commands started through the
/commands routes keep the two streams apart.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import os
import signal
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolserver.errors import ToolArgumentError, ToolError, ToolTimeout
from toolserver.node.context import NodeContext
from toolserver.node.registry import tool

#: longest run_async (or sending input) waits for output before answering
_ASYNC_FIRST_WAIT = 1.0
_MAX_JOBS = 64
#: ended /commands jobs kept for listing and reattaching; older ones are forgotten first
_KEEP_ENDED = 16
#: how long an ended command's output pipes may stay open (a background child holds them)
_DRAIN_WAIT = 0.5
STDOUT, STDERR = "stdout", "stderr"


@dataclass(slots=True)
class Chunk:
    """Text one stream of a command printed."""

    stream: str
    text: str


class OutputLog:
    """Tagged output of one command: the last ``cap`` characters, positions counted from its start.

    Readers poll :meth:`read_from` with their own position and :meth:`wait_beyond` it; feeding or
    closing the log wakes every waiting reader.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.chunks: deque[Chunk] = deque()
        self.start = 0  # position of the first character kept
        self.total = 0  # characters ever written
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self._wake: asyncio.Future[None] = self._loop.create_future()

    def feed(self, stream: str, text: str) -> None:
        if not text:
            return
        self.chunks.append(Chunk(stream, text))
        self.total += len(text)
        excess = self.total - self.start - self.cap
        while excess > 0:
            first = self.chunks[0]
            if len(first.text) <= excess:
                self.chunks.popleft()
                cut = len(first.text)
            else:
                first.text = first.text[excess:]
                cut = excess
            self.start += cut
            excess -= cut
        self._notify()

    def close(self) -> None:
        """The command has ended (later output of its children is still taken)."""
        self.closed = True
        self._notify()

    def _notify(self) -> None:
        if not self._wake.done():
            self._wake.set_result(None)
        self._wake = self._loop.create_future()

    def read_from(self, pos: int) -> tuple[list[Chunk], int, int]:
        """Chunks written since ``pos``, how many characters before them are lost, the new position."""
        dropped = max(0, self.start - pos)
        pos = max(pos, self.start)
        out: list[Chunk] = []
        end = self.total
        for chunk in reversed(self.chunks):  # readers are mostly near the end
            if end <= pos:
                break
            begin = end - len(chunk.text)
            out.append(chunk if begin >= pos else Chunk(chunk.stream, chunk.text[pos - begin :]))
            end = begin
        out.reverse()
        return out, dropped, self.total

    def text_from(self, pos: int) -> tuple[str, int]:
        """All streams' text since ``pos`` (with a note when part of it was dropped), the new position."""
        chunks, dropped, pos = self.read_from(pos)
        note = f"[... {dropped} characters of earlier output omitted ...]\n" if dropped else ""
        return note + "".join(c.text for c in chunks), pos

    async def wait_beyond(self, pos: int, seconds: float) -> None:
        """Return once there is output past ``pos`` or the log closed, or after ``seconds``."""
        if self.total > pos or self.closed:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._wake), seconds)


class ShellJob:
    """One command: its process, its output log and how it ended."""

    def __init__(
        self,
        job_id: int,
        command: str,
        proc: asyncio.subprocess.Process,
        cap: int,
        *,
        merged: bool,
        background: bool,
    ) -> None:
        self.id = job_id
        self.command = command
        self.proc = proc
        self.log = OutputLog(cap)
        self.merged = merged
        #: a /commands job that runs on without a client (kept after it ends, for reattaching)
        self.background = background
        self.read_pos = 0  # the tool's reading position
        self.killed = False
        self.timed_out = False
        self.started_at = time.time()
        self.ended_at: float | None = None
        self.watchdog: asyncio.TimerHandle | None = None
        loop = asyncio.get_running_loop()
        self.readers = [loop.create_task(self._read(proc.stdout, STDOUT))]
        if not merged:
            self.readers.append(loop.create_task(self._read(proc.stderr, STDERR)))
        #: done once the process has exited and its output is drained (or the drain gave up)
        self.done = loop.create_task(self._finish())

    async def _read(self, pipe: asyncio.StreamReader | None, stream: str) -> None:
        assert pipe is not None
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while chunk := await pipe.read(65536):
            self.log.feed(stream, decoder.decode(chunk))
        self.log.feed(stream, decoder.decode(b"", final=True))

    async def _finish(self) -> None:
        await self.proc.wait()
        # a background child may keep the pipes open: do not wait for it forever
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(asyncio.gather(*self.readers)), _DRAIN_WAIT)
        self.ended_at = time.time()
        if self.watchdog is not None:
            self.watchdog.cancel()
        self.log.close()

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    @property
    def ended(self) -> bool:
        """Exited and drained: nothing more will be reported for it."""
        return self.done.done()

    @property
    def status(self) -> str:
        if self.running:
            return "running"
        if self.timed_out:
            return "timeout"
        return "killed" if self.killed else "exited"

    def take_output(self) -> str:
        text, self.read_pos = self.log.text_from(self.read_pos)
        return text

    def info(self) -> dict[str, Any]:
        """What GET /commands says about the job."""
        return {
            "id": self.id,
            "command": self.command,
            "status": self.status,
            "exit_code": self.proc.returncode,
            "background": self.background,
            "stdin": self.proc.stdin is not None,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "output_chars": self.log.total,
        }


class ShellManager:
    """The commands of one node: foreground ones while they run, background ones until read or killed."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.jobs: dict[int, ShellJob] = {}
        self.groups: set[int] = set()
        self._next_id = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(
        self,
        command: str,
        interactive: bool,
        *,
        merged: bool = True,
        background: bool = False,
        cap: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - a limit for the command, not for this call
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> ShellJob:
        """Start ``command``; ``interactive`` opens its stdin, ``merged`` sends stderr to stdout.

        With ``timeout`` the command (its whole group) is killed after that many seconds.
        """
        self._forget_old()
        if len(self.jobs) >= _MAX_JOBS:
            raise ToolError(f"too many commands ({_MAX_JOBS}) are open; kill some first")
        proc = await asyncio.create_subprocess_exec(
            self.ctx.config.shell_executable,
            "-c",
            command,
            stdin=asyncio.subprocess.PIPE if interactive else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT if merged else asyncio.subprocess.PIPE,
            cwd=cwd or self.ctx.workspace,
            env={**self.ctx.child_env, **env} if env else self.ctx.child_env,
            start_new_session=True,
        )
        self.groups.add(proc.pid)
        job = ShellJob(
            self._next_id,
            command,
            proc,
            cap=cap or self.ctx.config.max_output_chars,
            merged=merged,
            background=background,
        )
        if timeout is not None:
            job.watchdog = asyncio.get_running_loop().call_later(timeout, self._expire, job)
        self.jobs[job.id] = job
        self._next_id += 1
        return job

    def _expire(self, job: ShellJob) -> None:
        if job.running:
            job.timed_out = True
            self._spawn(self.kill(job))

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _forget_old(self) -> None:
        """Forget the oldest ended background commands beyond the _KEEP_ENDED most recent."""
        ended = [j for j in self.jobs.values() if j.background and j.ended]
        for job in ended[: max(0, len(ended) - _KEEP_ENDED)]:
            self.forget(job)

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
            await asyncio.wait_for(asyncio.shield(job.done), seconds)
        except TimeoutError:
            return False
        return True

    async def settle(self, job: ShellJob, seconds: float) -> None:
        """Wait until the command prints something new (then a moment more) or ends, at most ``seconds``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while job.running and job.log.total <= job.read_pos and loop.time() < deadline:
            await job.log.wait_beyond(job.read_pos, deadline - loop.time())
        await self.wait(job, min(0.1, max(0.0, deadline - loop.time())))

    async def kill(self, job: ShellJob, grace: float = 1.0) -> None:
        """SIGTERM the command's process group, SIGKILL it after ``grace`` seconds."""
        job.killed = True
        signal_group(job.proc.pid, signal.SIGTERM)
        exited = await self.wait(job, grace)
        # also whatever in the group ignored SIGTERM or outlived bash
        signal_group(job.proc.pid, signal.SIGKILL)
        if not exited:
            await self.wait(job, 2.0)

    def abandon(self, job: ShellJob) -> None:
        """Its client went away: kill the command (in the background) and forget it."""

        async def end() -> None:
            await self.kill(job)
            self.forget(job)

        self._spawn(end())

    def forget(self, job: ShellJob) -> None:
        self.jobs.pop(job.id, None)
        for reader in job.readers:
            if not reader.done():
                reader.cancel()

    def report(self, job: ShellJob) -> dict[str, Any]:
        result: dict[str, Any] = {"shell_id": job.id, "output": job.take_output()}
        if job.running:
            result["status"] = "running"
        else:
            result["status"] = "killed" if job.killed else "exited"
            result["returncode"] = job.proc.returncode
            if job.read_pos >= job.log.total:
                self.forget(job)
        return result

    async def aclose(self) -> None:
        """Kill every process group ever started (background children included), at once."""
        for pgid in self.groups:
            signal_group(pgid, signal.SIGKILL)
        for job in list(self.jobs.values()):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(job.proc.wait(), 1.0)
            self.forget(job)
        for task in list(self._tasks):
            task.cancel()
        self.groups.clear()


def signal_group(pgid: int, sig: int) -> None:
    """Send ``sig`` to process group ``pgid``; nothing when it is gone."""
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
        signal_group(job.proc.pid, signal.SIGKILL)
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
