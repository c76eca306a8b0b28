"""The Swarm stack deployed for real (issue 15): ``docker/stack/stack.yml`` with the images
``scripts/build-stack-images.sh`` builds here, two manager replicas on one PostgreSQL behind nginx,
nodes as Swarm services.

The swarm is the machine's engine advertising the host end of a veth pair (``swarm_on_veth``):
the managers run in containers, where 127.0.0.1 is the container, and reach the nodes' host-mode
ports at the swarm's address. Sessions made through the load balancer land on both replicas and
are served by either; a replica killed (``docker kill``) costs no session and no call but the one
in flight; a replica scaled away hands its nodes to the other. Everything is removed afterwards
(stack, node services, secret, volumes; the swarm as the test session had it)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.cluster_support import CALC
from tests.support import wait_until
from tests.swarm_engines import docker, swarm_on_veth, why_not
from toolserver.runtimes.base import LABEL_MANAGER
from toolserver.testing import free_port
from toolserver.testing.tiers import docker_unavailable_reason

pytestmark = [pytest.mark.docker, pytest.mark.swarm, pytest.mark.slow, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parents[2]
STACK = "tsstack"
SECRET = "toolserver_db_password"  # the stack file's external secret
REPLICAS = {"swarm-manager-1", "swarm-manager-2"}

# run inside a manager container: every cookie's tool call on that replica, as JSON
CALL_EACH = """
import json, sys, urllib.request
key, body, cookies = sys.argv[1], sys.argv[2].encode(), sys.argv[3:]
out = {}
for cookie in cookies:
    req = urllib.request.Request("http://127.0.0.1:8080/execute_tool", data=body,
        headers={"Authorization": "Bearer " + key, "Cookie": "node_id=" + cookie,
                 "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as answer:
        out[cookie] = json.load(answer)
print(json.dumps(out))
"""


def replica_containers() -> dict[str, str]:
    """manager id (``swarm-manager-<slot>``) → id of its running container."""
    out = docker("ps", "-q", "--filter", f"label=com.docker.swarm.service.name={STACK}_manager")
    found = {}
    for cid in out.split():
        task = docker("inspect", "-f", '{{index .Config.Labels "com.docker.swarm.task.name"}}', cid).strip()
        found[f"swarm-manager-{task.split('.')[1]}"] = cid
    return found


def service_logs(service: str, lines: int = 40) -> str:
    argv = ["docker", "service", "logs", "--tail", str(lines), f"{STACK}_{service}"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60).stderr


def replica_answers(cid: str) -> bool:
    probe = "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/alive', timeout=2)"
    done = subprocess.run(["docker", "exec", cid, "python3", "-c", probe], capture_output=True, timeout=30)
    return done.returncode == 0


@contextlib.contextmanager
def deployed(port: int) -> Iterator[None]:
    """The stack deployed on the current swarm; every part of it and of its nodes removed after."""
    if docker("secret", "ls", "-q", "--filter", f"name={SECRET}").strip():
        pytest.skip(f"a Docker secret {SECRET} exists already (an operator's stack?)")
    docker("secret", "create", SECRET, "-", stdin=secrets.token_hex(24))
    node = docker("info", "-f", "{{.Swarm.NodeID}}").strip()
    docker("node", "update", "--label-add", "toolserver.db=true", node)
    env = {**os.environ, "TOOLSERVER_PUBLISH_PORT": str(port)}
    argv = ["docker", "stack", "deploy", "--resolve-image", "never", "-c", "docker/stack/stack.yml", STACK]
    try:
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        yield
    finally:
        docker("stack", "rm", STACK, check=False)
        for sid in docker("service", "ls", "-q", "--filter", f"label={LABEL_MANAGER}", check=False).split():
            docker("service", "rm", sid, check=False)
        stack_label = f"label=com.docker.stack.namespace={STACK}"

        def gone() -> bool:
            left = docker("ps", "-aq", "--filter", stack_label, check=False).split()
            left += docker("ps", "-aq", "--filter", f"label={LABEL_MANAGER}", check=False).split()
            return not left and not docker("network", "ls", "-q", "--filter", stack_label, check=False)

        with contextlib.suppress(AssertionError):
            wait_until(gone, timeout=90, interval=0.5, what="the stack's containers and network gone")
        docker("secret", "rm", SECRET, check=False)
        docker("node", "update", "--label-rm", "toolserver.db", node, check=False)
        volumes = docker("volume", "ls", "-q", "--filter", stack_label, check=False).split()
        volumes += docker("volume", "ls", "-q", "--filter", f"label={LABEL_MANAGER}", check=False).split()
        for volume in volumes:
            docker("volume", "rm", "-f", volume, check=False)


def test_the_stack_serves_sessions_through_either_replica_and_survives_losing_one() -> None:
    reason = docker_unavailable_reason() or why_not()
    if reason:
        pytest.skip(reason)
    started = time.monotonic()
    build = subprocess.run(
        ["bash", "scripts/build-stack-images.sh"], cwd=ROOT, capture_output=True, text=True, timeout=1200
    )
    assert build.returncode == 0, build.stderr[-3000:]
    built = time.monotonic()
    port = free_port("0.0.0.0")  # the lb publishes on every address
    lb = f"http://127.0.0.1:{port}"
    with swarm_on_veth(f"tsstk{os.getpid() % 1000}", 9), deployed(port):

        def serving() -> dict[str, str] | None:
            found = replica_containers()
            return found if set(found) == REPLICAS and all(map(replica_answers, found.values())) else None

        replicas = wait_until(serving, timeout=180, interval=0.5, what="both replicas serving")
        crashed = docker("service", "ps", "-q", "--filter", "desired-state=shutdown", f"{STACK}_manager")
        assert not crashed.split(), f"a replica failed at start:\n{service_logs('manager')}"
        alive = lambda: httpx.get(lb + "/alive", timeout=5).status_code == 200  # noqa: E731
        wait_until(alive, timeout=60, interval=0.5, what="the load balancer answers")
        up = time.monotonic()
        keys = ("toolserver", "keys", "create", "admin", "--scope", "admin")
        key = docker("exec", replicas["swarm-manager-1"], *keys).splitlines()[0].strip()
        auth = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=lb, headers=auth, timeout=120, trust_env=False) as client:
            # sessions made through the lb land on both replicas; either lists them all
            cookies = []
            for _ in range(4):
                r = client.post("/get_cookie")
                assert r.status_code == 200, r.text
                cookies.append(r.cookies["node_id"])
            client.cookies.clear()
            holders = {row["manager_id"] for row in client.get("/admin/sessions").json()}
            assert holders == REPLICAS, holders
            assert {s["session_id"] for s in client.get("/sessions").json()["sessions"]} == set(cookies)

            # each replica serves every session, whichever made it
            for cid in replicas.values():
                script = ("python3", "-c", CALL_EACH, key, json.dumps(CALC), *cookies)
                answers = json.loads(docker("exec", cid, *script))
                assert answers == dict.fromkeys(cookies, 42)

            def call(cookie: str) -> int:
                try:
                    r = client.post("/execute_tool", json=CALC, headers={"Cookie": f"node_id={cookie}"})
                    return 0 if r.status_code == 200 and r.json() == 42 else 1
                except httpx.HTTPError:
                    return 1

            # replica 1 killed under calls: Swarm restarts it in its slot; no call fails but one
            # that was in flight on it (nginx sends refused connections to the other replica)
            stop, tally = threading.Event(), {"calls": 0, "failed": 0}

            def load() -> None:
                while not stop.is_set():
                    for cookie in cookies:
                        tally["failed"] += call(cookie)
                        tally["calls"] += 1

            worker = threading.Thread(target=load)
            worker.start()
            try:
                time.sleep(1)
                docker("kill", replicas["swarm-manager-1"])

                def back() -> bool:
                    new = replica_containers().get("swarm-manager-1")
                    return new not in (None, replicas["swarm-manager-1"]) and replica_answers(str(new))

                wait_until(back, timeout=120, interval=0.5, what="Swarm restarts replica 1")
                time.sleep(3)  # and nginx finds it again
            finally:
                stop.set()
                worker.join(120)
            print(f"\n[stack] built {built - started:.0f} s, up {up - built:.0f} s; kill: {tally}")
            assert tally["calls"] > 20 and tally["failed"] <= 1, tally

            # scaled to one replica (Swarm picks which; a graceful stop ends its lease): the one
            # left adopts the other's nodes
            docker("service", "update", "--detach", "--replicas", "1", f"{STACK}_manager")
            left = wait_until(lambda: len(r := replica_containers()) == 1 and r, timeout=60, what="scaled")
            holders_now = lambda: {row["manager_id"] for row in client.get("/admin/sessions").json()}  # noqa: E731
            try:
                wait_until(lambda: holders_now() == set(left), timeout=60, interval=0.5, what="adopted")
            except AssertionError as exc:
                logs = service_logs("manager")
                raise AssertionError(f"{exc}: {holders_now()}, left {left}\n{logs}") from None
            assert sum(map(call, cookies)) == 0

            for cookie in cookies:
                r = client.post("/release_session", headers={"Cookie": f"node_id={cookie}"})
                assert r.status_code == 200, r.text
            assert client.get("/sessions").json() == {"sessions": []}
            nodes = ["service", "ls", "-q", "--filter", f"label={LABEL_MANAGER}"]
            wait_until(lambda: not docker(*nodes).strip(), timeout=60, interval=0.5, what="nodes removed")
