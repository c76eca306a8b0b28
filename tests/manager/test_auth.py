"""API keys in front of a real manager: every way to send one, owners, revocation, quotas."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import httpx
import pytest
import requests

from tests.support import ManagerProcess, free_port, wait_until
from toolserver.client import ToolServerClient
from toolserver.errors import ClientError

CALC = {"tool_name": "calculator", "arguments": {"expression": "6*7"}}


def toolserver(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TOOLSERVER_")}
    return subprocess.run(
        [sys.executable, "-m", "toolserver", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**clean, **(env or {})},
    )


def keys(manager: ManagerProcess, *args: str) -> subprocess.CompletedProcess:
    return toolserver("keys", "--config", str(manager.config_path), *args)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_keys_from_the_cli_and_every_way_to_send_one(manager_factory: Callable[..., ManagerProcess]) -> None:
    manager = manager_factory(auth="api_keys")
    created = keys(manager, "create", "alice")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("tsk_") and "shown only now" in created.stderr
    listed = json.loads(keys(manager, "list", "--json").stdout)
    assert [(k["name"], k["scope"], k["state"]) for k in listed] == [("alice", "user", "active")]
    assert key not in json.dumps(listed) and key.split("_")[1] == listed[0]["id"]
    [stored] = manager.query("SELECT secret_hash FROM api_keys")
    assert key not in stored["secret_hash"]

    url = manager.url
    assert requests.get(f"{url}/alive").json() == "alive"  # no key needed
    for headers in ({}, bearer("tsk_00000000_" + "x" * 43), {"X-API-Key": "garbage"}):
        refused = requests.post(f"{url}/get_cookie", headers=headers)
        assert refused.status_code == 401, refused.text
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    assert "Authorization: Bearer" in requests.post(f"{url}/get_cookie").json()["detail"]
    assert (
        "unknown API key" in requests.post(f"{url}/execute_tool", headers={"X-API-Key": "x"}).json()["detail"]
    )

    # XAgent is given only a base URL: the key rides in it as HTTP Basic credentials
    xagent_url = f"http://key:{key}@127.0.0.1:{manager.port}"
    jar = requests.post(f"{xagent_url}/get_cookie").cookies
    assert requests.post(f"{xagent_url}/execute_tool", json=CALC, cookies=jar).json() == 42
    cookie = {"node_id": jar["node_id"]}  # requests files the cookie under "key:...@host"
    assert requests.post(f"{xagent_url}/execute_tool", json=CALC, cookies=cookie).json() == 42
    assert (
        requests.post(f"{url}/execute_tool", json=CALC, cookies=cookie, headers={"X-API-Key": key}).json()
        == 42
    )
    assert requests.post(f"{url}/execute_tool", json=CALC, cookies=cookie, headers=bearer(key)).json() == 42
    assert requests.post(f"{url}/execute_tool", json=CALC, cookies=cookie).status_code == 401
    released = requests.post(f"{xagent_url}/release_session", cookies=cookie)
    assert released.status_code == 200 and cookie["node_id"] not in released.text  # no cookie echoed

    # the SDK and the command line
    with ToolServerClient(url, api_key=key) as client, client.session() as session:
        assert session.execute_tool("calculator", {"expression": "2**10"}) == 1024
    with ToolServerClient(url) as client, pytest.raises(ClientError) as err:
        client.get_cookie()
    assert err.value.status_code == 401
    out = toolserver("exec", "--url", url, "calculator", "expression=6*7", env={"TOOLSERVER_API_KEY": key})
    assert out.returncode == 0 and out.stdout.strip() == "42", out.stderr
    assert manager.nodes() == []
    assert key not in manager.log()


def test_a_session_belongs_to_the_key_that_opened_it(manager_factory: Callable[..., ManagerProcess]) -> None:
    manager = manager_factory(auth="api_keys")
    alice, bob, admin = (
        manager.create_key(n, s) for n, s in [("alice", "user"), ("bob", "user"), ("ops", "admin")]
    )
    with httpx.Client(base_url=manager.url, trust_env=False, timeout=60) as http:
        opened = http.post("/get_cookie", headers=bearer(alice))
        assert opened.status_code == 200, opened.text
        cookie = {"Cookie": f"node_id={opened.cookies['node_id']}"}
        [record] = manager.nodes()
        [alice_id] = [r["id"] for r in manager.query("SELECT id FROM api_keys WHERE name = 'alice'")]
        assert record["owner"] == alice_id
        # bob holds the cookie, yet the session is not his (whatever his body says: CALC is a bad
        # body for every session route, and ownership is checked first)
        for path in (
            "/execute_tool",
            "/get_available_tools",
            "/extend_session",
            "/fork_session",
            "/pause_session",
            "/resume_session",
            "/close_session",
            "/reconnect_session",
            "/release_session",
        ):
            answer = http.post(path, json=CALC, headers={**cookie, **bearer(bob)})
            assert answer.status_code == 403, (path, answer.text)
            assert "another API key" in answer.json()["detail"]
        assert http.get("/admin/sessions", headers=bearer(bob)).status_code == 403
        assert manager.node(opened.cookies["node_id"])["status"] == "running"
        # the owner and an admin key may
        assert http.post("/execute_tool", json=CALC, headers={**cookie, **bearer(alice)}).json() == 42
        assert http.post("/execute_tool", json=CALC, headers={**cookie, **bearer(admin)}).json() == 42
        assert http.post("/release_session", headers={**cookie, **bearer(admin)}).status_code == 200
    assert manager.nodes() == []


def test_revoked_and_expired_keys_are_refused_by_every_worker_within_the_cache_time(
    manager_factory: Callable[..., ManagerProcess],
) -> None:
    first = manager_factory(auth="api_keys", key_cache_seconds=1)
    second = manager_factory(start=False, auth="api_keys", key_cache_seconds=1)
    second.share_with(first).start()
    carol, dave = first.create_key("carol", "user"), first.create_key("dave", "user")
    with httpx.Client(trust_env=False, timeout=60) as http:
        for m in (first, second):  # both workers have the keys cached now
            for key in (carol, dave):
                assert http.post(f"{m.url}/no_such_path", headers=bearer(key)).status_code == 404
        assert keys(first, "revoke", "carol").returncode == 0
        assert keys(first, "expire", "dave", "now").returncode == 0
        revoked_at = time.monotonic()
        for m in (first, second):
            for key, word in ((carol, "revoked"), (dave, "expired")):
                answer = wait_until(
                    lambda m=m, key=key: (
                        (r := http.post(f"{m.url}/get_cookie", headers=bearer(key))).status_code == 401 and r
                    ),
                    timeout=5,
                    what=f"{word} key refused",
                )
                assert word in answer.json()["detail"]
        assert time.monotonic() - revoked_at < 5
    assert first.nodes() == []


def test_quotas_live_sessions_and_starts_per_minute(manager_factory: Callable[..., ManagerProcess]) -> None:
    manager = manager_factory(auth="api_keys", node={"creation_wait_seconds": 120})
    two = manager.create_key("two-at-a-time", "user", max_sessions=2)
    three = manager.create_key("three-a-minute", "user", starts_per_minute=3, max_sessions=0)
    with httpx.Client(base_url=manager.url, trust_env=False, timeout=120) as http:
        first, second = (http.post("/get_cookie", headers=bearer(two)) for _ in range(2))
        assert first.status_code == second.status_code == 200
        over = http.post("/get_cookie", headers=bearer(two))
        assert over.status_code == 429 and int(over.headers["Retry-After"]) > 0
        assert "max_sessions = 2" in over.json()["detail"] and "two-at-a-time" in over.json()["detail"]
        closed = {"Cookie": f"node_id={first.cookies['node_id']}", **bearer(two)}
        assert http.post("/close_session", headers=closed).status_code == 200
        assert http.post("/get_cookie", headers=bearer(two)).status_code == 200  # a closed one is not live
        again = http.post("/reconnect_session", headers=closed)
        assert again.status_code == 429 and "max_sessions" in again.json()["detail"]

        for _ in range(3):
            started = http.post("/get_cookie", headers=bearer(three))
            assert started.status_code == 200, started.text
            cookie = {"Cookie": f"node_id={started.cookies['node_id']}", **bearer(three)}
            assert http.post("/release_session", headers=cookie).status_code == 200
        refused = http.post("/get_cookie", headers=bearer(three))
        assert refused.status_code == 429, refused.text
        assert "starts_per_minute = 3" in refused.json()["detail"]
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        for record in manager.nodes():
            http.post("/release_session", headers={"Cookie": f"node_id={record['id']}", **bearer(two)})
    assert manager.nodes() == []


async def test_a_key_quota_holds_across_worker_processes(
    manager_factory: Callable[..., ManagerProcess],
) -> None:
    node = {"creation_wait_seconds": 120, "health_check_interval": 1}
    first = manager_factory(auth="api_keys", node=node)
    second = manager_factory(start=False, auth="api_keys", node=node)
    second.share_with(first).start()
    key = first.create_key("shared", "user", max_sessions=3)
    async with httpx.AsyncClient(timeout=180, trust_env=False, headers=bearer(key)) as http:
        answers = await asyncio.gather(*(http.post(f"{m.url}/get_cookie") for m in [first, second] * 4))
        codes = sorted(a.status_code for a in answers)
        assert codes == [200] * 3 + [429] * 5, codes
        assert all("max_sessions" in a.json()["detail"] for a in answers if a.status_code == 429)
        for answer in answers:
            if answer.status_code == 200:
                await http.post(
                    f"{first.url}/release_session", headers={"Cookie": f"node_id={answer.cookies['node_id']}"}
                )
    assert first.nodes() == []


def test_no_keys_on_a_network_address_needs_an_explicit_yes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from toolserver.errors import ConfigError
    from toolserver.manager.settings import load_settings

    config = tmp_path / "manager.yml"
    config.write_text(f"database_url: sqlite+aiosqlite:///{tmp_path}/t.db\ndata_dir: {tmp_path}\n")
    refused = toolserver("manager", "--config", str(config), "--host", "0.0.0.0", "--port", str(free_port()))
    assert refused.returncode == 2
    assert "auth: api_keys" in refused.stderr and "allow_unauthenticated_network" in refused.stderr
    with pytest.raises(ConfigError, match="reachable from the network"):
        load_settings(None, host="::")
    assert load_settings(None, host="0.0.0.0", allow_unauthenticated_network=True).auth == "none"
    assert load_settings(None, host="0.0.0.0", auth="api_keys").auth == "api_keys"
    assert load_settings(None, host="localhost").auth == "none"
