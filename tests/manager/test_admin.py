"""The admin API, /metrics (with a key and on metrics_listen) and the session event log."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable

import httpx

from tests.support import ManagerProcess, free_port, wait_until

CALC = {"tool_name": "calculator", "arguments": {"expression": "6*7"}}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text ``text``."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        sname, _, rest = series.partition("{")
        have = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if sname == name and have == want:
            return float(value)
    raise AssertionError(f"no sample {name}{{{want}}} in:\n{text}")


def test_admin_api_and_metrics(manager_factory: Callable[..., ManagerProcess]) -> None:
    metrics_port = free_port()
    manager = manager_factory(
        auth="api_keys", metrics_listen=f"127.0.0.1:{metrics_port}", node={"warm_pool_size": 1}
    )
    admin, alice = manager.create_key("ops", "admin"), manager.create_key("alice", "user", max_sessions=1)
    with httpx.Client(base_url=manager.url, trust_env=False, timeout=60) as http:
        pool = wait_until(
            lambda: (p := http.get("/admin/pool", headers=bearer(admin)).json())["ready"] == 1 and p,
            timeout=30,
            what="a ready pool node",
        )
        assert pool["target"] == 1 and pool["misses"] == 0
        mine = http.post(
            "/get_cookie", json={"labels": {"team": "search", "run": "7"}}, headers=bearer(alice)
        )
        assert mine.status_code == 200, mine.text
        mine_cookie = {"Cookie": f"node_id={mine.cookies['node_id']}"}
        assert http.post("/execute_tool", json=CALC, headers={**mine_cookie, **bearer(alice)}).json() == 42
        refused = http.post("/get_cookie", headers=bearer(alice))
        assert refused.status_code == 429
        theirs = http.post("/get_cookie", headers=bearer(admin))
        theirs_cookie = {"Cookie": f"node_id={theirs.cookies['node_id']}"}

        def sessions(**params: str) -> list[dict]:
            answer = http.get("/admin/sessions", params=params, headers=bearer(admin))
            assert answer.status_code == 200, answer.text
            return answer.json()

        everything = sessions()
        assert len(everything) == 2
        [alices] = sessions(owner="alice")
        assert alices["labels"] == {"team": "search", "run": "7"} and alices["owner_name"] == "alice"
        assert [s["short_id"] for s in sessions(label="team=search")] == [alices["short_id"]]
        assert [s["short_id"] for s in sessions(label="run")] == [alices["short_id"]]
        assert sessions(label="team=other") == [] and sessions(min_age_seconds="3600") == []
        assert len(sessions(status="running")) == 2 and len(sessions(max_age_seconds="3600")) == 2
        # the pool refills a moment after its node was claimed (pool.REFILL_DELAY_SECONDS)
        wait_until(lambda: any(s["pooled"] for s in sessions(pooled="true")), timeout=30, what="a refill")
        text = json.dumps(everything)
        for record in manager.nodes():
            assert record["id"] not in text and record["secret"] not in text

        short = alices["short_id"]
        detail = http.get(f"/admin/sessions/{short}", headers=bearer(admin)).json()
        assert [e["kind"] for e in detail["events"]] == ["claimed"]
        stopped = http.post(f"/admin/sessions/{short}/stop", headers=bearer(admin))
        assert stopped.status_code == 200, stopped.text
        assert manager.node(mine.cookies["node_id"])["status"] == "exited"
        time.sleep(1.1)  # past the route cache
        assert (
            http.post("/execute_tool", json=CALC, headers={**mine_cookie, **bearer(alice)}).status_code == 503
        )
        events = http.get(f"/admin/sessions/{short}", headers=bearer(admin)).json()["events"]
        assert [(e["kind"], e["detail"]) for e in events][-1] == ("closed", "by admin ops")

        # drain: no new sessions, the existing ones keep working
        assert http.post("/admin/drain", headers=bearer(admin)).json() == {
            "draining": True,
            "live_sessions": 1,
        }
        drained = http.post("/get_cookie", headers=bearer(admin))
        assert drained.status_code == 503 and "draining" in drained.json()["detail"]
        assert http.post("/execute_tool", json=CALC, headers={**theirs_cookie, **bearer(admin)}).json() == 42
        assert http.delete("/admin/drain", headers=bearer(admin)).json()["draining"] is False

        for path in ("/admin/sessions", "/admin/pool", "/admin/drain", "/admin/keys", "/metrics"):
            assert http.get(path, headers=bearer(alice)).status_code == 403, path
            assert http.get(path).status_code == 401, path
        keys = http.get("/admin/keys", headers=bearer(admin)).json()
        assert {k["name"] for k in keys} == {"ops", "alice"} and admin not in json.dumps(keys)

        scraped = http.get("/metrics", headers=bearer(admin))
        assert scraped.headers["content-type"].startswith("text/plain")
        text = scraped.text
        assert metric(text, "toolserver_sessions", owner="alice", status="exited") == 1
        assert metric(text, "toolserver_sessions", owner="ops", status="running") == 1
        assert metric(text, "toolserver_session_starts_total", source="pool") == 1
        assert metric(text, "toolserver_session_start_seconds_count", source="pool") == 1
        assert metric(text, "toolserver_proxy_requests_total", route="/execute_tool", status="200") == 2
        assert metric(text, "toolserver_proxy_bytes_total", direction="from_node") > 0
        assert metric(text, "toolserver_quota_refusals_total", quota="max_sessions") == 1
        assert metric(text, "toolserver_checker_tick_seconds_count") > 0
        assert metric(text, "toolserver_auth_failures_total") == 5
        assert metric(text, "toolserver_pool_nodes", state="target") == 1
        # the same numbers without a key on metrics_listen
        plain = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", trust_env=False).text
        assert metric(plain, "toolserver_quota_refusals_total", quota="max_sessions") == 1

        released = http.post(f"/admin/sessions/{short}/release", headers=bearer(admin))
        assert released.status_code == 200 and manager.node(mine.cookies["node_id"]) is None
        assert http.post(f"/admin/sessions/{short}/release", headers=bearer(admin)).status_code == 404
        assert http.post("/release_session", headers={**theirs_cookie, **bearer(admin)}).status_code == 200

        schema = http.get("/openapi.json", headers=bearer(admin)).json()
        assert {"/admin/sessions", "/admin/sessions/{short_id}/{action}", "/admin/drain", "/metrics"} <= set(
            schema["paths"]
        )
        body = schema["paths"]["/get_cookie"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert "SessionOptions" in json.dumps(body)


def test_session_events_are_logged_once_each_without_secrets(
    manager_factory: Callable[..., ManagerProcess],
) -> None:
    manager = manager_factory(auth="api_keys", log_format="json")
    key = manager.create_key("alice", "user")
    with httpx.Client(base_url=manager.url, trust_env=False, timeout=60, headers=bearer(key)) as http:
        opened = http.post("/get_cookie", json={"labels": {"job": "nightly"}})
        cookie = {"Cookie": f"node_id={opened.cookies['node_id']}"}
        [record] = manager.nodes()
        short = record["short_id"]
        assert http.post("/close_session", headers=cookie).status_code == 200
        assert http.post("/reconnect_session", headers=cookie).status_code == 200
        [node] = manager.node_processes()
        os.kill(node.pid, signal.SIGKILL)
        wait_until(
            lambda: manager.node(opened.cookies["node_id"])["status"] == "exited", timeout=10, what="died"
        )
        assert http.post("/release_session", headers=cookie).status_code == 200
        lines_before = len(manager.log().splitlines())
        time.sleep(1.5)  # seven checker ticks with no node: nothing to say
        assert len(manager.log().splitlines()) == lines_before

    records = [json.loads(line) for line in manager.log().splitlines() if line.startswith("{")]
    assert len(records) == len(manager.log().splitlines()), "every line is one JSON object"
    kinds = [r["event"] for r in records if r.get("session") == short]
    assert kinds == ["created", "closed", "reconnected", "died", "released"], kinds
    created = next(r for r in records if r.get("event") == "created")
    assert created["owner"] == "alice" and "job" in created["message"] and created["level"] == "INFO"
    died = next(r for r in records if r.get("event") == "died")
    assert died["level"] == "WARNING" and "signal 9" in died["message"]
    log = manager.log()
    for secret in (key, record["id"], record["secret"]):
        assert secret not in log
    assert "HTTP Request" not in log  # no line per health check
    rows = manager.query("SELECT kind FROM session_events WHERE short_id = ? ORDER BY id", short)
    assert [r["kind"] for r in rows] == kinds
