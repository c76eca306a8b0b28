"""GET /terminal: a real bash on a pseudo-terminal over a WebSocket, with resize, Ctrl-C and hang-up."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from tests.support import sleeping, until_async
from toolserver.protocol import SECRET_HEADER

from .conftest import SECRET, Node


class Screen:
    """What the terminal printed so far, read from the WebSocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.text = ""
        self.controls: list[dict[str, object]] = []

    async def expect(self, needle: str, within: float = 20) -> None:
        deadline = time.monotonic() + within
        while needle not in self.text:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{needle!r} not on the screen: {self.text[-500:]!r}")
            msg = await self.ws.receive(timeout=remaining)
            if msg.type == aiohttp.WSMsgType.BINARY:
                self.text += msg.data.decode(errors="replace")
            elif msg.type == aiohttp.WSMsgType.TEXT:
                self.controls.append(json.loads(msg.data))
            else:
                raise AssertionError(
                    f"the WebSocket ended ({msg.type}) before {needle!r}: {self.text[-500:]!r}"
                )

    async def type(self, keys: str | bytes) -> None:
        await self.ws.send_bytes(keys.encode() if isinstance(keys, str) else keys)


async def test_a_terminal_runs_commands_resizes_interrupts_and_exits(node: Node) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(f"{node.url}/terminal?cols=100&rows=30", headers={SECRET_HEADER: SECRET}) as ws,
    ):
        screen = Screen(ws)
        await screen.type("stty size; echo $((6*7))x; tty\r")
        await screen.expect("30 100")
        await screen.expect("42x")
        await screen.expect("/dev/pts/")
        await ws.send_str(json.dumps({"type": "resize", "cols": 51, "rows": 11}))
        await screen.type("stty size\r")
        await screen.expect("11 51")
        # Ctrl-C reaches the foreground job: the terminal is the shell's controlling terminal
        await screen.type("sleep 4801; echo after-$?\r")
        await asyncio.sleep(0.5)
        await screen.type(b"\x03")
        await screen.type("echo interrupted\r")
        await screen.expect("interrupted")
        await screen.type("exit 4\r")
        msg = await ws.receive(timeout=20)
        while msg.type == aiohttp.WSMsgType.BINARY:
            msg = await ws.receive(timeout=20)
        assert msg.type == aiohttp.WSMsgType.TEXT and json.loads(msg.data) == {"type": "exit", "exit_code": 4}
        assert (await ws.receive(timeout=10)).type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 1000
    assert not sleeping("4801")


async def test_closing_the_websocket_hangs_the_terminal_up(node: Node) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(f"{node.url}/terminal", headers={SECRET_HEADER: SECRET}) as ws,
    ):
        screen = Screen(ws)
        await screen.type("sleep 4802 & sleep 4803\r")
        await until_async(lambda: len(sleeping("4802", "4803")) == 2, what="the sleeps")
    # the client is gone: the background job (its own process group) and the foreground one end
    await until_async(lambda: not sleeping("4802", "4803"), 10, "the terminal's processes to end")


async def test_a_terminal_needs_the_secret_and_a_sane_size(node: Node) -> None:
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"{node.url}/terminal")
        assert refused.value.status == 401
        async with http.ws_connect(f"{node.url}/terminal?cols=0", headers={SECRET_HEADER: SECRET}) as ws:
            msg = await ws.receive(timeout=10)
            assert (
                json.loads(msg.data)["type"] == "error" and "terminal size" in json.loads(msg.data)["detail"]
            )
            assert (await ws.receive(timeout=10)).type == aiohttp.WSMsgType.CLOSE
            assert ws.close_code == 1008
        # the shared node allows 3 terminals at once
        opened = [
            await http.ws_connect(f"{node.url}/terminal", headers={SECRET_HEADER: SECRET}) for _ in range(3)
        ]
        async with http.ws_connect(f"{node.url}/terminal", headers={SECRET_HEADER: SECRET}) as fourth:
            msg = await fourth.receive(timeout=10)
            assert "max_terminals" in json.loads(msg.data)["detail"]
        for ws in opened:
            await ws.close()
    assert node.ok("calculator", expression="1+1") == 2
