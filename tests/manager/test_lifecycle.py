"""Session options, lifetime, pause and wake, fork: through a real manager and real nodes on every tier."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import ManagerProcess, inprocess_manager, wait_until
from toolserver.protocol import EXPIRES_HEADER, WOKEN_HEADER
from toolserver.runtimes.process import ProcessRuntime
from toolserver.runtimes.registry import runtime_class
from toolserver.testing.tiers import Tier, tier_params

WRITE = "FileSystemEnv_write_to_file"
READ = "FileSystemEnv_read_from_file"
CELL = "PythonNotebook_execute_cell"
#: A file outside the workspace, in a Docker node's home (the container's filesystem)
INSTALLED = "~/.local/installed.txt"


@pytest.fixture(params=tier_params())
def tier(request: pytest.FixtureRequest) -> Tier:
    return request.param  # type: ignore[no-any-return]


def _needs(tier: Tier, capability: str) -> None:
    """Skip, naming it, a tier whose runtime lacks ``capability`` (its 409 is tested below)."""
    if capability not in runtime_class(tier.name).capabilities:
        pytest.skip(f"tier {tier.name}: no {capability!r} capability")


def _start(factory: Callable[..., ManagerProcess], tier: Tier, **node: Any) -> ManagerProcess:
    config = tier.manager_config()
    sessions = node.pop("sessions", None)
    if sessions:
        config["sessions"] = sessions
    return factory(**config, node={"health_check_interval": 0.2, **node})


def _new(client: httpx.Client, body: dict[str, Any] | None = None) -> tuple[str, httpx.Response]:
    resp = client.post("/get_cookie", json=body) if body is not None else client.post("/get_cookie")
    assert resp.status_code == 200, resp.text
    return resp.cookies["node_id"], resp


def _tool(client: httpx.Client, cookie: str, tool: str, **arguments: Any) -> httpx.Response:
    return client.post(
        "/execute_tool", json={"tool_name": tool, "arguments": arguments}, headers=_cookie(cookie)
    )


def _cookie(cookie: str) -> dict[str, str]:
    return {"Cookie": f"node_id={cookie}"}


def _post(client: httpx.Client, path: str, cookie: str, body: Any = None) -> httpx.Response:
    return client.post(path, json=body, headers=_cookie(cookie))


def _events(manager: ManagerProcess, cookie_or_short: str) -> list[str]:
    rows = manager.query(
        "SELECT e.kind FROM session_events e WHERE e.short_id = ? ORDER BY e.id", cookie_or_short
    )
    return [r["kind"] for r in rows]


def _short(manager: ManagerProcess, cookie: str) -> str:
    record = manager.node(cookie)
    assert record is not None
    return str(record["short_id"])


# ---- options ---------------------------------------------------------------------------------------


def test_bad_options_are_refused_naming_the_key(manager_factory: Callable[..., ManagerProcess]) -> None:
    manager = manager_factory(sessions={"max_timeout_seconds": 600, "max_idle_seconds": 60})
    with httpx.Client(base_url=manager.url, timeout=60) as client:
        cases = {
            "colour": {"colour": "red"},
            "timeout_seconds": {"timeout_seconds": 601},
            "idle_seconds": {"idle_seconds": 61},
            "resources": {"resources": {"memory": "1g"}},  # the process tier cannot enforce limits
            "network": {"network": "bridge"},
            "isolation": {"isolation": "docker"},
            "env": {"env": {"1BAD": "x"}},
        }
        for key, body in cases.items():
            resp = client.post("/get_cookie", json=body)
            assert resp.status_code == 422, (key, resp.text)
            assert key in resp.json()["detail"], (key, resp.text)
            assert "Traceback" not in resp.text
        assert manager.nodes() == []  # nothing was started for a refused request
        # XAgent's empty body still works, and the answer names the session and its (absent) expiry
        cookie, resp = _new(client)
        assert resp.json()["session_id"] == _short(manager, cookie)
        assert resp.json()["expires_at"] is None and EXPIRES_HEADER not in resp.headers
        assert _post(client, "/release_session", cookie).status_code == 200


def test_env_reaches_the_tools_and_the_pool_serves_only_matching_requests(
    manager_factory: Callable[..., ManagerProcess], tier: Tier
) -> None:
    manager = _start(manager_factory, tier, warm_pool_size=1)

    def pooled() -> list[str]:
        return [
            r["id"]
            for r in manager.query("SELECT id FROM toolserver_nodes WHERE pooled AND health='healthy'")
        ]

    pool = wait_until(lambda: pooled() or None, timeout=60, what="pool filled")
    with httpx.Client(base_url=manager.url, timeout=60) as client:
        # options that shape the node: the pool node does not match, the session starts cold
        cookie, _ = _new(client, {"env": {"GREETING": "hello from the options"}})
        assert cookie not in pool and pooled() == pool
        assert _events(manager, _short(manager, cookie))[0] == "created"
        resp = _post(client, "/commands", cookie, {"command": "echo $GREETING"})
        assert "hello from the options" in resp.text, resp.text
        # options that do not shape the node (labels, lifetime): the pool node serves
        claimed, resp = _new(client, {"labels": {"run": "x"}, "timeout_seconds": 300})
        assert claimed in pool
        assert _events(manager, _short(manager, claimed))[0] == "claimed"
        assert resp.json()["expires_at"] and resp.headers[EXPIRES_HEADER] == resp.json()["expires_at"]
        assert manager.node(claimed)["expires_at"] is not None
        for c in (cookie, claimed):
            assert _post(client, "/release_session", c).status_code == 200


# ---- lifetime --------------------------------------------------------------------------------------


def test_ttl_expires_reconnect_keeps_it_extend_moves_it(
    manager_factory: Callable[..., ManagerProcess],
) -> None:
    manager = manager_factory(node={"health_check_interval": 0.2})
    with httpx.Client(base_url=manager.url, timeout=60) as client:
        cookie, resp = _new(client, {"timeout_seconds": 8})
        expires = resp.json()["expires_at"]
        short = _short(manager, cookie)
        # a reconnect alone does not move the expiry
        resp = _post(client, "/reconnect_session", cookie)
        assert resp.status_code == 200 and resp.headers[EXPIRES_HEADER] == expires
        # a forwarded request's answer says it too
        assert _tool(client, cookie, WRITE, filepath="a.txt", content="x").headers[EXPIRES_HEADER] == expires
        # the checker releases the session when its lifetime is over
        wait_until(lambda: manager.node(cookie) is None, timeout=30, what="session expired")
        wait_until(lambda: _events(manager, short)[-1] == "expired", timeout=10, what="expired event")
        assert _tool(client, cookie, READ, filepath="a.txt").status_code == 403

        cookie, resp = _new(client, {"timeout_seconds": 6})
        resp = _post(client, "/extend_session", cookie, {"timeout_seconds": 3600})
        extended = resp.json()["expires_at"]
        assert resp.status_code == 200 and _from_now(extended) > timedelta(minutes=59)
        assert resp.headers[EXPIRES_HEADER] == extended
        # a reconnect with timeout_seconds moves it too; a value above the maximum is refused
        resp = _post(client, "/reconnect_session", cookie, {"timeout_seconds": 7200})
        assert resp.status_code == 200 and _from_now(resp.headers[EXPIRES_HEADER]) > timedelta(minutes=119)
        bad = _post(client, "/reconnect_session", cookie, {"timeout": 5})
        assert bad.status_code == 422 and "unknown key 'timeout'" in bad.json()["detail"]
        too_long = _post(client, "/extend_session", cookie, {"timeout_seconds": 10**9})
        assert too_long.status_code == 422 and "timeout_seconds" in too_long.json()["detail"]
        unknown = _post(client, "/extend_session", cookie, {"seconds": 5})
        assert unknown.status_code == 422 and "seconds" in unknown.json()["detail"]
        time.sleep(6.5)  # past the first lifetime: the extension holds
        assert manager.node(cookie) is not None
        assert _post(client, "/release_session", cookie).status_code == 200


def _from_now(expires: str) -> timedelta:
    return datetime.fromisoformat(expires.rstrip("Z")) - datetime.now(UTC).replace(tzinfo=None)


# ---- pause, resume, wake ---------------------------------------------------------------------------


def test_pause_keeps_the_kernel_and_a_request_wakes_it(
    manager_factory: Callable[..., ManagerProcess], tier: Tier
) -> None:
    _needs(tier, "pause")
    manager = _start(manager_factory, tier)
    with httpx.Client(base_url=manager.url, timeout=120) as client:
        cookie, _ = _new(client)
        assert _tool(client, cookie, CELL, code="secret_number = 6 * 7").status_code == 200
        resp = _post(client, "/pause_session", cookie)
        assert resp.status_code == 200 and resp.json()["status"] == "paused", resp.text
        assert manager.node(cookie)["status"] == "paused"
        # the checker keeps it paused (the runtime reports it so)
        wait_until(lambda: _events(manager, _short(manager, cookie))[-1] == "paused", timeout=5)
        # a request wakes it, and the kernel's variables survived
        resp = _tool(client, cookie, CELL, code="print(secret_number)")
        assert resp.status_code == 200 and "42" in resp.text, resp.text
        assert resp.headers[WOKEN_HEADER] == "resumed"
        assert manager.node(cookie)["status"] == "running"
        assert WOKEN_HEADER not in _tool(client, cookie, CELL, code="1").headers
        # pause then resume explicitly
        assert _post(client, "/pause_session", cookie).status_code == 200
        resp = _post(client, "/resume_session", cookie)
        assert resp.status_code == 200 and resp.json()["status"] == "running"
        assert "42" in _tool(client, cookie, CELL, code="print(secret_number)").text
        # a stopped node cannot be paused
        assert _post(client, "/close_session", cookie).status_code == 200
        resp = _post(client, "/pause_session", cookie)
        assert resp.status_code == 409 and "exited" in resp.json()["detail"]
        assert _post(client, "/release_session", cookie).status_code == 200


def test_concurrent_requests_to_a_paused_node_share_one_wake(
    manager_factory: Callable[..., ManagerProcess], tier: Tier
) -> None:
    _needs(tier, "pause")
    manager = _start(manager_factory, tier)
    with httpx.Client(base_url=manager.url, timeout=120) as client:
        cookie, _ = _new(client)
        short = _short(manager, cookie)
        assert _post(client, "/pause_session", cookie).status_code == 200

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=manager.url, timeout=120) as client:
            return await asyncio.gather(
                *(client.post("/get_available_tools", headers=_cookie(cookie)) for _ in range(10))
            )

    answers = asyncio.run(burst())
    assert [r.status_code for r in answers] == [200] * 10
    assert {r.headers.get(WOKEN_HEADER) for r in answers} == {"resumed"}
    assert _events(manager, short).count("woken") == 1
    with httpx.Client(base_url=manager.url, timeout=60) as client:
        assert _post(client, "/release_session", cookie).status_code == 200


@pytest.mark.parametrize("action", ["stop", "pause"])
def test_an_idle_node_sleeps_and_the_next_request_wakes_it(
    manager_factory: Callable[..., ManagerProcess], action: str
) -> None:
    manager = manager_factory(node={"health_check_interval": 0.2, "idle_action": action})
    with httpx.Client(base_url=manager.url, timeout=120) as client:
        cookie, _ = _new(client, {"idle_seconds": 1})
        assert _tool(client, cookie, WRITE, filepath="kept.txt", content="still here").status_code == 200
        assert _tool(client, cookie, CELL, code="x = 'in memory'").status_code == 200
        status = "exited" if action == "stop" else "paused"
        wait_until(lambda: manager.node(cookie)["status"] == status, timeout=30, what=f"idle node {status}")
        resp = _tool(client, cookie, READ, filepath="kept.txt")  # was a 503 before
        assert resp.status_code == 200 and "still here" in resp.text
        assert resp.headers[WOKEN_HEADER] == ("restarted" if action == "stop" else "resumed")
        memory = _tool(client, cookie, CELL, code="print(x)")
        assert ("in memory" in memory.text) is (action == "pause")
        # a session closed by its client is not woken by a request (XAgent's 503)
        assert _post(client, "/close_session", cookie).status_code == 200
        resp = _tool(client, cookie, READ, filepath="kept.txt")
        assert resp.status_code == 503 and "not running" in resp.text
        assert _post(client, "/release_session", cookie).status_code == 200


# ---- fork ------------------------------------------------------------------------------------------


def test_fork_copies_the_workspace_and_leaves_the_source_alone(
    manager_factory: Callable[..., ManagerProcess], tier: Tier
) -> None:
    _needs(tier, "fork")
    manager = _start(manager_factory, tier)
    with httpx.Client(base_url=manager.url, timeout=120) as client:
        source, _ = _new(client, {"labels": {"team": "a"}})
        assert (
            _tool(client, source, WRITE, filepath="dir/file.txt", content="from the source").status_code
            == 200
        )
        assert _tool(client, source, CELL, code="y = 1").status_code == 200
        if tier.name == "docker":  # a change outside the workspace (a package the agent installed)
            install = f"mkdir -p ~/.local && echo package > {INSTALLED} && cat {INSTALLED}"
            assert "package" in _post(client, "/commands", source, {"command": install}).text
        resp = _post(client, "/fork_session", source, {"timeout_seconds": 600})
        assert resp.status_code == 200, resp.text
        answer = resp.json()
        fork = resp.cookies["node_id"]
        assert (
            fork != source
            and answer["memory_forked"] is False
            and "memory is not forked" in answer["message"]
        )
        assert answer["source"] == _short(manager, source) and answer["expires_at"]
        assert manager.node(fork)["secret"] != manager.node(source)["secret"]
        assert manager.node(fork)["labels"] == manager.node(source)["labels"]
        assert "from the source" in _tool(client, fork, READ, filepath="dir/file.txt").text
        assert "NameError" in _tool(client, fork, CELL, code="print(y)").text  # memory is not forked
        if tier.name == "docker":  # the container's filesystem changes come along
            assert "package" in _post(client, "/commands", fork, {"command": f"cat {INSTALLED}"}).text
        # each goes its own way
        assert _tool(client, fork, WRITE, filepath="dir/file.txt", content="from the fork").status_code == 200
        assert "from the source" in _tool(client, source, READ, filepath="dir/file.txt").text
        assert "1" in _tool(client, source, CELL, code="print(y)").text
        bad = _post(client, "/fork_session", source, {"env": {"A": "b"}})
        assert bad.status_code == 422 and "env" in bad.json()["detail"]
        assert "forked" in _events(manager, _short(manager, source))
        for c in (source, fork):
            assert _post(client, "/release_session", c).status_code == 200


# ---- the SDK ---------------------------------------------------------------------------------------


def test_sdk_pause_resume_extend_fork(manager: ManagerProcess) -> None:
    from toolserver.client import ToolServerClient

    with ToolServerClient(manager.url) as client, client.session(timeout=300, labels={"via": "x"}) as session:
        session.execute_tool(WRITE, {"filepath": "sdk.txt", "content": "from the sdk"})
        assert session.python("z = 5").error is None
        assert session.pause().status == "paused"
        assert session.resume().status == "running"
        assert "5" in session.python("print(z)").text
        state = session.extend(7200)
        assert _from_now(state.expires_at or "") > timedelta(minutes=119)
        with session.fork(timeout=60) as fork:
            assert fork.session_id != session.session_id
            assert "from the sdk" in str(fork.execute_tool(READ, {"filepath": "sdk.txt"}))
            assert json.loads(manager.node(fork.session_id)["labels"]) == {"via": "x"}
        assert manager.node(fork.session_id) is None  # released on leaving the block


def test_openapi_describes_the_routes_and_options(tmp_path: Path) -> None:
    from toolserver.manager.app import create_app
    from toolserver.manager.settings import load_settings
    from toolserver.testing import scratch_config

    schema = create_app(load_settings(None, **scratch_config(tmp_path))).openapi()
    for path in ("/extend_session", "/pause_session", "/resume_session", "/fork_session"):
        assert "409" in schema["paths"][path]["post"]["responses"], path
    models = schema["components"]["schemas"]
    options = set(models["SessionOptions"]["properties"])
    wanted = {"labels", "timeout_seconds", "idle_seconds", "env", "resources", "network", "isolation"}
    assert wanted <= options
    assert "memory_forked" in models["ForkAnswer"]["properties"]
    assert "expires_at" in models["CookieAnswer"]["properties"]


@pytest.mark.docker
def test_docker_nodes_get_the_resources_and_network_asked_for(
    manager_factory: Callable[..., ManagerProcess],
) -> None:
    from toolserver.testing.tiers import DOCKER, docker_unavailable_reason

    if docker_unavailable_reason():
        pytest.skip(f"tier docker: {docker_unavailable_reason()}")
    manager = _start(manager_factory, DOCKER, sessions={"networks": ["bridge"]})
    with httpx.Client(base_url=manager.url, timeout=120) as client:
        too_much = client.post("/get_cookie", json={"resources": {"cpus": 64}})
        assert too_much.status_code == 422 and "resources.cpus" in too_much.json()["detail"]
        cookie, _ = _new(client, {"resources": {"memory": "512m", "cpus": 0.5}, "network": "bridge"})
        state = json.loads(manager.node(cookie)["runtime_state"])
        host = json.loads(
            subprocess.run(
                ["docker", "inspect", "-f", "{{json .HostConfig}}", state["container_id"]],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        assert host["Memory"] == 512 * 1024 * 1024 and host["NanoCpus"] == 500_000_000
        assert host["NetworkMode"] == "bridge"
        assert _tool(client, cookie, WRITE, filepath="ok.txt", content="reachable").status_code == 200
        assert _post(client, "/release_session", cookie).status_code == 200


class NoPauseNoForkRuntime(ProcessRuntime):
    """A tier without the optional capabilities (as a third-party runtime may be)."""

    capabilities = frozenset()


async def test_a_tier_without_the_capability_answers_409_naming_it(tmp_path: Path) -> None:
    manager = inprocess_manager(tmp_path, NoPauseNoForkRuntime)
    async with manager as (url, _app), httpx.AsyncClient(base_url=url, timeout=60) as client:
        resp = await client.post("/get_cookie")
        cookie = _cookie(resp.cookies["node_id"])
        for path, capability in (("/pause_session", "pause"), ("/fork_session", "fork")):
            refused = await client.post(path, headers=cookie)
            assert refused.status_code == 409, refused.text
            assert f"'{capability}' capability" in refused.json()["detail"]
        assert (await client.post("/release_session", headers=cookie)).status_code == 200
