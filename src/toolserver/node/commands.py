"""The /commands routes: run a command and stream its output as it is printed; list, reattach, stdin, kill.

Built on the shell tool's jobs (:mod:`toolserver.node.tools.shell`): one job model, one id space,
so a background ``shell_id`` of the tool can be listed and reattached to here as well. Streams are
NDJSON, one event per line (see :mod:`toolserver.protocol` for the routes and bodies)::

    {"type": "start", "id": 3, "command": "make test"}     first line
    {"type": "stdout", "data": "..."}  {"type": "stderr", "data": "..."}
    {"type": "dropped", "chars": 1234}    output lost before this point (only the last part is kept)
    {"type": "keepalive"}                 after command_keepalive_seconds without output (proxies
                                          time idle reads out)
    {"type": "exit", "exit_code": 0, "status": "exited" | "killed" | "timeout"}   the command ended
    {"type": "detached", "status": "running"}   the stream ends while the command runs on

A foreground command belongs to the stream that started it: when that client goes away, the command
is killed. A background command runs on without a client until it ends or is killed; its last
``command_buffer_chars`` characters stay readable until it is forgotten (the oldest ended
background commands beyond the 16 most recent are).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.exceptions import HTTPException
from starlette.responses import StreamingResponse

from toolserver.node.context import NodeContext
from toolserver.node.tools.shell import Chunk, ShellJob, ShellManager
from toolserver.protocol import NDJSON_MEDIA_TYPE, CommandConnectRequest, CommandRequest, CommandStdinRequest

#: longest text of one stdout/stderr event
_EVENT_CHARS = 64 * 1024


def _line(event: dict[str, Any]) -> bytes:
    return json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _events(chunks: list[Chunk]) -> list[dict[str, Any]]:
    """Consecutive chunks of one stream joined into events of at most _EVENT_CHARS characters."""
    events: list[dict[str, Any]] = []
    for chunk in chunks:
        text = chunk.text
        if events and events[-1]["type"] == chunk.stream and len(events[-1]["data"]) < _EVENT_CHARS:
            room = _EVENT_CHARS - len(events[-1]["data"])
            events[-1]["data"] += text[:room]
            text = text[room:]
        for i in range(0, len(text), _EVENT_CHARS):
            events.append({"type": chunk.stream, "data": text[i : i + _EVENT_CHARS]})
    return events


class Commands:
    """The handlers of the /commands routes for one node."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx

    @property
    def shell(self) -> ShellManager:
        return self.ctx.service("shell", ShellManager)

    def job(self, job_id: int) -> ShellJob:
        job = self.shell.jobs.get(job_id)
        if job is None:
            raise HTTPException(
                404,
                f"no command with id {job_id}: it never existed, or it ended and was forgotten; "
                "GET /commands lists the commands there are",
            )
        return job

    async def start(self, req: CommandRequest) -> tuple[ShellJob, StreamingResponse | None]:
        """Start the command; for a foreground one also the stream that follows it."""
        cwd = self.ctx.resolve(req.cwd) if req.cwd else None
        if cwd is not None and not cwd.is_dir():
            raise HTTPException(400, f"cwd {req.cwd!r} is not a directory of the workspace")
        job = await self.shell.start(
            req.command,
            interactive=req.stdin,
            merged=False,
            background=req.background,
            cap=self.ctx.config.command_buffer_chars,
            timeout=req.timeout,
            cwd=cwd,
            env=req.env,
        )
        if req.background:
            return job, None
        return job, self.stream(job, 0, follow=True, owner=True)

    def connect(self, req: CommandConnectRequest) -> StreamingResponse:
        job = self.job(req.id)
        pos = job.log.total if req.from_ == "now" else 0
        return self.stream(job, pos, follow=req.follow)

    def stream(self, job: ShellJob, pos: int, *, follow: bool, owner: bool = False) -> StreamingResponse:
        return StreamingResponse(
            self._follow(job, pos, follow, owner),
            media_type=NDJSON_MEDIA_TYPE,
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def _follow(self, job: ShellJob, pos: int, follow: bool, owner: bool) -> AsyncIterator[bytes]:
        yield _line({"type": "start", "id": job.id, "command": job.command})
        try:
            while True:
                ended = job.ended  # before reading: what it printed until then is in this read
                chunks, dropped, pos = job.log.read_from(pos)
                if dropped:
                    yield _line({"type": "dropped", "chars": dropped})
                for event in _events(chunks):
                    yield _line(event)
                if ended:
                    yield _line({"type": "exit", "exit_code": job.proc.returncode, "status": job.status})
                    return
                if not follow:
                    yield _line({"type": "detached", "status": job.status})
                    return
                await job.log.wait_beyond(pos, self.ctx.config.command_keepalive_seconds)
                if job.log.total == pos and not job.log.closed:
                    yield _line({"type": "keepalive"})
        finally:
            if owner and job.ended:  # a foreground command is gone with its stream
                self.shell.forget(job)
            elif owner:  # the client went away from its foreground command
                self.shell.abandon(job)

    def list(self) -> dict[str, Any]:
        return {"commands": [job.info() for job in self.shell.jobs.values()]}

    async def stdin(self, req: CommandStdinRequest) -> dict[str, Any]:
        job = self.job(req.id)
        pipe = job.proc.stdin
        if pipe is None:
            raise HTTPException(409, f"command {job.id} was started without stdin (start it with stdin=true)")
        if not job.running or pipe.is_closing():
            raise HTTPException(409, f"command {job.id} takes no more input (it ended or closed its stdin)")
        data = req.data.encode()
        pipe.write(data)
        try:
            await pipe.drain()
            if req.eof:
                pipe.close()
        except ConnectionError:
            raise HTTPException(409, f"command {job.id} closed its stdin") from None
        return {"id": job.id, "written": len(data), "eof": req.eof}

    async def kill(self, job_id: int) -> dict[str, Any]:
        job = self.job(job_id)
        if job.running:
            await self.shell.kill(job)
        return job.info()
