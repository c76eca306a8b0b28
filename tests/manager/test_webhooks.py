"""Session events to webhooks: signed, in order, retried while the receiver is down, never in the way."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support import ManagerProcess, config_refusal, wait_until
from toolserver.manager.webhooks import EVENT_HEADER, SIGNATURE_HEADER, verify
from toolserver.testing import free_port

SECRET = "webhook-test-secret"


class Receiver:
    """A loopback webhook receiver on ``port``, started (and stopped) when the test says."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.events: list[dict[str, Any]] = []
        self.bad_signatures = 0
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if not verify(SECRET, body, self.headers.get(SIGNATURE_HEADER)):
                    receiver.bad_signatures += 1
                    self.send_response(401)
                else:
                    event = json.loads(body)
                    assert self.headers[EVENT_HEADER] == event["kind"]
                    receiver.events.append(event)
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def kinds(self, session: str) -> list[str]:
        return [e["kind"] for e in self.events if e["session"] == session]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(free_port())
    yield r
    r.stop()


def test_events_reach_a_receiver_that_was_down_in_order_and_signed(
    manager_factory: Callable[..., ManagerProcess], receiver: Receiver
) -> None:
    manager = manager_factory(
        node={"health_check_interval": 0.2},
        events={"webhooks": [receiver.url], "secret": SECRET, "retry_max_seconds": 0.5},
    )
    cookie_header = {}
    with httpx.Client(base_url=manager.url, timeout=60) as client:
        # the receiver is down: the session's requests go on regardless
        resp = client.post("/get_cookie", json={"labels": {"run": "hooks"}})
        assert resp.status_code == 200
        short = resp.json()["session_id"]
        cookie_header = {"Cookie": f"node_id={resp.cookies['node_id']}"}
        assert client.post("/pause_session", headers=cookie_header).status_code == 200
        woke = client.post("/get_available_tools", headers=cookie_header)
        assert woke.status_code == 200 and woke.headers["X-Node-Woken"] == "resumed"
        assert client.post("/close_session", headers=cookie_header).status_code == 200
        assert client.post("/release_session", headers=cookie_header).status_code == 200
    expected = ["created", "paused", "woken", "closed", "released"]
    assert receiver.events == []
    receiver.start()  # it comes back: every event arrives, once, in order
    wait_until(lambda: receiver.kinds(short) == expected, timeout=30, what=f"events {expected}")
    assert receiver.bad_signatures == 0
    first = receiver.events[0]
    assert first["labels"] == {"run": "hooks"} and first["manager_id"] == manager.manager_id
    seqs = [e["seq"] for e in receiver.events]
    assert seqs == sorted(seqs) and len(set(e["id"] for e in receiver.events)) == len(seqs)
    assert "retrying" in manager.log()


def test_webhooks_need_a_secret(tmp_path: Path) -> None:
    config = tmp_path / "manager.yml"
    config.write_text(yaml.safe_dump({"events": {"webhooks": ["http://127.0.0.1:9/hook"]}}))
    refused = config_refusal(config)
    assert refused.returncode != 0 and "events.secret" in refused.stderr + refused.stdout
    assert "Traceback" not in refused.stderr
