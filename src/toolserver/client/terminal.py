"""A session's terminal on this one (``toolserver shell SESSION``), like ``docker exec -it``.

The manager forwards the WebSocket ``/terminal`` to the session's node, which runs bash on a
pseudo-terminal there. Here the local terminal goes into raw mode, keystrokes go out as they are
typed, the node's output is written as it comes, and a window size change (SIGWINCH) is sent as a
resize. When the remote shell ends (``exit``, or Ctrl-D on an empty line) the local terminal is
restored and its exit status returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import termios
import tty
from collections.abc import Iterator
from urllib.parse import urlencode

import aiohttp

from toolserver.client import _wire as wire
from toolserver.errors import ClientError

#: what the terminal gets when piped input ends (Ctrl-D: end of input at the start of a line)
_EOF = b"\x04"


def _size(fd: int) -> tuple[int, int]:
    """``(cols, rows)`` of the terminal on ``fd`` (80x24 when it is none)."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        size = shutil.get_terminal_size()
    return size.columns, size.lines


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """The terminal on ``fd`` in raw mode (keys unprocessed, no echo) until exit; nothing if no tty."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSANOW)  # keep what was typed ahead
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def attach(base_url: str, session_id: str, stdin: int, stdout: int, api_key: str | None = None) -> int:
    """Relay the session's terminal to ``stdin``/``stdout`` until its shell ends; its exit status.

    ``api_key`` (else ``$TOOLSERVER_API_KEY``) for a manager with API keys; credentials in
    ``base_url`` work as well.
    """
    loop = asyncio.get_running_loop()
    cols, rows = _size(stdout)
    url = f"{base_url.rstrip('/')}/terminal?{urlencode({'cols': cols, 'rows': rows})}"
    headers = {**wire.cookie_headers(session_id), **wire.auth_headers(api_key)}
    keys: asyncio.Queue[bytes | str] = asyncio.Queue()  # keystrokes (bytes) and resizes (JSON text)

    def typed() -> None:
        data = os.read(stdin, 4096)
        keys.put_nowait(data or _EOF)
        if not data:  # piped input ended
            loop.remove_reader(stdin)

    async with (
        aiohttp.ClientSession(trust_env=False) as http,
        http.ws_connect(url, headers=headers, autoclose=True) as ws,
    ):

        async def send_keys() -> None:
            while True:
                item = await keys.get()
                await (ws.send_str(item) if isinstance(item, str) else ws.send_bytes(item))

        def resized() -> None:
            cols, rows = _size(stdout)
            keys.put_nowait(json.dumps({"type": "resize", "cols": cols, "rows": rows}))

        loop.add_reader(stdin, typed)
        loop.add_signal_handler(signal.SIGWINCH, resized)
        sender = asyncio.ensure_future(send_keys())
        status = 0
        try:
            async for message in ws:
                if message.type == aiohttp.WSMsgType.BINARY:
                    os.write(stdout, message.data)
                elif message.type == aiohttp.WSMsgType.TEXT:
                    control = json.loads(message.data)
                    if control.get("type") == "exit":
                        status = int(control.get("exit_code") or 0)
                    elif control.get("type") == "error":
                        raise ClientError(f"the node refused the terminal: {control.get('detail')}")
        finally:
            sender.cancel()
            loop.remove_signal_handler(signal.SIGWINCH)
            loop.remove_reader(stdin)
    return status if status >= 0 else 128 - status  # killed by a signal: 128 + its number, as shells say


def run(base_url: str, session_id: str, api_key: str | None = None) -> int:
    """``toolserver shell``: the session's terminal on this process's terminal; its exit status."""
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    sys.stdout.flush()
    with raw_mode(stdin):
        try:
            return asyncio.run(attach(base_url, session_id, stdin, stdout, api_key))
        except aiohttp.WSServerHandshakeError as exc:
            message = f"GET /terminal: {exc.status} the manager refused the terminal"
            raise ClientError(message, exc.status, "the manager refused the terminal") from None
        except aiohttp.ClientError as exc:
            raise ClientError(f"the terminal's connection failed: {exc}") from None
