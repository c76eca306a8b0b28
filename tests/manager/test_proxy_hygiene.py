"""What the proxy sends to a node and hands back: no credentials forwarded, one Date header, and a
node that breaks off its answer costs one log line, not a traceback.

The session's record is pointed at a loopback HTTP server of the test's own (the checker is off,
so nothing puts the record back), which shows exactly what reaches "the node".
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from aiohttp import web

from tests.support import ManagerProcess, free_port

SEEN: list[dict[str, str]] = []


async def _echo(request: web.Request) -> web.StreamResponse:
    SEEN.append(dict(request.headers))
    if request.path == "/download_file":  # promises 1 MiB, sends 64 KiB, then drops the connection
        response = web.StreamResponse(headers={"Content-Length": str(1 << 20)})
        await response.prepare(request)
        await response.write(b"x" * 65536)
        assert request.transport is not None
        request.transport.abort()
        return response
    return web.json_response("echo", headers={"Date": "Mon, 01 Jan 2001 00:00:00 GMT"})


@pytest.fixture
async def upstream() -> AsyncIterator[int]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    SEEN.clear()
    try:
        yield port
    finally:
        await runner.cleanup()


async def test_what_reaches_the_node_and_what_comes_back(
    manager_factory: Callable[..., ManagerProcess], upstream: int
) -> None:
    # points the node's record at a TCP listener of the test's: the process tier's address kind
    manager = manager_factory(auth="api_keys", builtin_monitor=False, isolation="process")
    key = manager.create_key("alice", "user")
    auth = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=manager.url, trust_env=False, timeout=60) as http:
        opened = await http.post("/get_cookie", headers=auth)
        node_id = opened.cookies["node_id"]
        [record] = manager.nodes()
        real_port = record["port"]
        manager.query("UPDATE toolserver_nodes SET port = ? WHERE id = ?", upstream, node_id)
        await asyncio.sleep(1.2)  # past the route cache
        cookie = {"Cookie": f"node_id={node_id}; theme=dark"}
        for headers in (auth, {"X-API-Key": key}, {"Authorization": f"Basic {_basic(key)}"}):
            answer = await http.post("/execute_tool", json={"tool_name": "x"}, headers={**cookie, **headers})
            assert answer.status_code == 200 and answer.json() == "echo", answer.text
            assert len(answer.headers.get_list("date")) == 1  # the manager's own, not the node's too
            assert answer.headers["date"] != "Mon, 01 Jan 2001 00:00:00 GMT"
        for seen in SEEN:
            lowered = {k.lower(): v for k, v in seen.items()}
            assert "authorization" not in lowered and "x-api-key" not in lowered
            assert key not in json.dumps(seen) and node_id not in json.dumps(seen)
            assert lowered["x-toolserver-node-secret"] == record["secret"]
            assert lowered["cookie"] == "theme=dark"

        # the "node" breaks off a download: the client sees it cut, the manager logs one warning
        with pytest.raises(httpx.RemoteProtocolError):
            await http.post("/download_file", json={"file_path": "big"}, headers={**cookie, **auth})
        await asyncio.sleep(0.3)
        log = manager.log()
        assert "broke off its answer on /download_file" in log
        assert "Traceback" not in log and "Exception in ASGI application" not in log
        assert (await http.get("/alive")).status_code == 200

        manager.query("UPDATE toolserver_nodes SET port = ? WHERE id = ?", real_port, node_id)
        await asyncio.sleep(1.2)
        assert (await http.post("/release_session", headers={**cookie, **auth})).status_code == 200
    assert manager.nodes() == []


def _basic(key: str) -> str:
    import base64

    return base64.b64encode(f"key:{key}".encode()).decode()
