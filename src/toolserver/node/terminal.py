"""``GET /terminal`` (a WebSocket): an interactive bash on a pseudo-terminal, in the workspace.

Binary messages carry the terminal's bytes both ways. Text messages are JSON control messages:
the client sends ``{"type": "resize", "cols": C, "rows": R}``; the node sends ``{"type": "exit",
"exit_code": N}`` when the shell has ended, then closes the WebSocket (code 1000). The first size
comes from the query (``?cols=80&rows=24``). When the client closes the WebSocket, the terminal hangs
up: SIGHUP to everything of its session, SIGKILL to what is left after a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import logging
import os
import signal
import struct
import termios
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from toolserver.node.context import NodeContext

log = logging.getLogger("toolserver.node")

_READ = 65536
_HANGUP_GRACE = 1.0
_MAX_SIDE = 1000


def _new_session_on_tty(tty: int) -> None:
    """In the child between fork and exec: a session of its own, with ``tty`` as its controlling
    terminal (so that Ctrl-C and job control work). uvloop calls this before it sets up the child's
    stdin and before it would call setsid for ``start_new_session``: hence the fd, and setsid here."""
    os.setsid()
    fcntl.ioctl(tty, termios.TIOCSCTTY, 0)


def _size(value: Any, default: int) -> int:
    """A terminal side from the query or a resize message; ValueError when it is not one."""
    if value is None:
        return default
    number = int(value)
    if not 1 <= number <= _MAX_SIDE:
        raise ValueError(f"a terminal side must be 1..{_MAX_SIDE}, got {number}")
    return number


def _session_members(sid: int) -> list[int]:
    """Pids of the processes of session ``sid`` (job control puts each job in its own group)."""
    members = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                if os.getsid(int(name)) == sid:
                    members.append(int(name))
    return members


class Terminal:
    """One bash on a pseudo-terminal."""

    def __init__(self, ctx: NodeContext, cols: int, rows: int) -> None:
        self.ctx = ctx
        self.cols, self.rows = cols, rows
        self.master = -1
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        master, slave = os.openpty()
        try:
            self.master = master
            os.set_blocking(master, False)
            self.resize(self.cols, self.rows)
            env = {
                **self.ctx.child_env,
                "TERM": "xterm-256color",
                "HISTFILE": str(self.ctx.state_dir / "bash_history"),
            }
            self.proc = await asyncio.create_subprocess_exec(
                self.ctx.config.shell_executable,
                "-i",
                stdin=slave,
                stdout=slave,
                stderr=slave,
                cwd=self.ctx.workspace,
                env=env,
                preexec_fn=functools.partial(_new_session_on_tty, slave),
            )
        except BaseException:
            os.close(master)
            self.master = -1
            raise
        finally:
            os.close(slave)

    def resize(self, cols: int, rows: int) -> None:
        """Set the window size; the kernel sends SIGWINCH to the terminal's foreground job."""
        self.cols, self.rows = cols, rows
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    async def _ready(self, writer: bool = False) -> None:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        add, remove = (
            (loop.add_writer, loop.remove_writer) if writer else (loop.add_reader, loop.remove_reader)
        )
        add(self.master, lambda: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            remove(self.master)

    def _read_available(self) -> bytes | None:
        """What the terminal has printed so far; None once it is closed (EIO: no process holds it)."""
        data = bytearray()
        while len(data) < 4 * _READ:
            try:
                chunk = os.read(self.master, _READ)
            except BlockingIOError:
                break
            except OSError:
                return bytes(data) or None
            if not chunk:
                return bytes(data) or None
            data += chunk
        return bytes(data)

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.master, view) :]
            except BlockingIOError:
                await self._ready(writer=True)

    async def output(self) -> Any:
        """Yield what the terminal prints until the shell has ended (and its output is drained)."""
        assert self.proc is not None
        exited = asyncio.ensure_future(self.proc.wait())
        try:
            while True:
                readable = asyncio.ensure_future(self._ready())
                await asyncio.wait({readable, exited}, return_when=asyncio.FIRST_COMPLETED)
                readable.cancel()
                data = self._read_available()
                if data:
                    yield data
                if data is None or exited.done():
                    return
        finally:
            exited.cancel()

    async def hangup(self) -> None:
        """SIGHUP to everything of the terminal's session, SIGKILL to what is left after a grace."""
        if self.proc is not None:
            sid = self.proc.pid
            for pid in _session_members(sid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGHUP)
                    os.kill(pid, signal.SIGCONT)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), _HANGUP_GRACE)
            for pid in _session_members(sid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), _HANGUP_GRACE)

    async def close(self) -> None:
        """Hang up and close the terminal."""
        await self.hangup()
        if self.master >= 0:
            os.close(self.master)
            self.master = -1


class Terminals:
    """The open terminals of one node; closed with the node."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.open: set[Terminal] = set()

    async def serve(self, ws: WebSocket) -> None:
        """Serve one terminal over ``ws`` until either side ends it."""
        try:
            cols = _size(ws.query_params.get("cols"), 80)
            rows = _size(ws.query_params.get("rows"), 24)
        except ValueError as exc:
            return await _refuse(ws, f"bad terminal size: {exc}")
        if len(self.open) >= self.ctx.config.max_terminals:
            limit = self.ctx.config.max_terminals
            return await _refuse(ws, f"this node already has {limit} terminals open (max_terminals)")
        term = Terminal(self.ctx, cols, rows)
        try:
            await term.start()
        except OSError as exc:
            return await _refuse(ws, f"cannot open a terminal: {exc}")
        self.open.add(term)
        try:
            await ws.accept()
            pump_in = asyncio.ensure_future(self._input(ws, term))
            try:
                async for data in term.output():
                    await ws.send_bytes(data)
                assert term.proc is not None
                code = await term.proc.wait()
                await ws.send_text(json.dumps({"type": "exit", "exit_code": code}))
                await ws.close(1000)
            except (WebSocketDisconnect, RuntimeError, OSError):
                pass  # the client is gone
            finally:
                pump_in.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pump_in
        finally:
            self.open.discard(term)
            await term.close()

    @staticmethod
    async def _input(ws: WebSocket, term: Terminal) -> None:
        """Client → terminal: keystrokes and resizes, until the client closes (then hang up)."""
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                break
            if message.get("bytes"):
                await term.write(message["bytes"])
            elif message.get("text"):
                try:
                    control = json.loads(message["text"])
                    if control.get("type") != "resize":
                        raise ValueError(f"unknown control message type {control.get('type')!r}")
                    term.resize(_size(control.get("cols"), term.cols), _size(control.get("rows"), term.rows))
                except (ValueError, AttributeError, TypeError) as exc:
                    reason = f"bad control message (want {{'type': 'resize', 'cols', 'rows'}}): {exc}"
                    await ws.close(1003, reason[:120])
                    break
        # the client closed: end the shell, which ends the output pump
        await term.hangup()

    async def aclose(self) -> None:
        for term in list(self.open):
            await term.close()
        self.open.clear()


async def _refuse(ws: WebSocket, reason: str) -> None:
    """Accept, say why in a close frame (code 1008, policy) and close: clients show the reason."""
    await ws.accept()
    await ws.send_text(json.dumps({"type": "error", "detail": reason}))
    await ws.close(1008, reason[:120])
