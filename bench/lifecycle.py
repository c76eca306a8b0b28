"""Benchmark: pause, resume, wake on request and fork, per tier, next to their bare references.

A real manager per tier (process, and Docker when it can run here) with one session whose
notebook kernel is up. Timed through the manager's HTTP API from a client on loopback:
``/pause_session`` and ``/resume_session``; wake on request, i.e. one forwarded call
(``/get_available_tools``) to a paused node (``X-Node-Woken: resumed``) and to a node the
checker stopped for idleness (``restarted``), next to the same call to a running node; and
``/fork_session`` of a session whose workspace holds 100 MB. References, in the same run: a bare
``docker pause``/``docker unpause`` (the CLI) of the session's container, and a bare ``cp -a``
of the workspace directory (for Docker, of the volume's directory on the host).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench import dockerenv
from bench.common import MIB, Context, Figure, Outcome, summary
from bench.procs import Manager
from toolserver.protocol import WOKEN_HEADER
from toolserver.testing.tiers import DOCKER, PROCESS, SANDBOX, Tier

NAME = "lifecycle"
TITLE = "Pause, resume, wake on request, fork"
CALL = "/get_available_tools"


def _timed(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1000, out


def _ok(resp: httpx.Response) -> httpx.Response:
    if resp.status_code != 200:
        raise RuntimeError(f"{resp.request.url.path}: {resp.status_code} {resp.text[:300]}")
    return resp


def _cp_reference(source: Path) -> float:
    """ms of a bare ``cp -a`` of ``source`` into a scratch directory."""
    with tempfile.TemporaryDirectory(prefix="bench-cp-") as scratch:
        t0 = time.perf_counter()
        subprocess.run(["cp", "-a", "--", f"{source}/.", scratch], check=True)
        return (time.perf_counter() - t0) * 1000


def _docker_cli(*args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(["docker", *args], check=True, capture_output=True, timeout=60)
    return (time.perf_counter() - t0) * 1000


def _measure(ctx: Context, tier: Tier, samples: int, fork_mib: int) -> dict[str, Any]:
    root = ctx.workdir / f"lifecycle-{tier.name}"
    manager = Manager(
        root, **tier.manager_config(), node={"health_check_interval": 0.2, "idle_action": "stop"}
    ).start()
    out: dict[str, Any] = {"tier": tier.name}
    try:
        with httpx.Client(base_url=manager.url, timeout=300) as client:
            resp = _ok(client.post("/get_cookie"))
            cookie = {"Cookie": f"node_id={resp.cookies['node_id']}"}
            record = manager.node(resp.cookies["node_id"])
            state = json.loads(record["runtime_state"]) if record["runtime_state"] else {}
            cell = {"tool_name": "PythonNotebook_execute_cell", "arguments": {"code": "kept = 1"}}
            _ok(client.post("/execute_tool", json=cell, headers=cookie))
            pause, resume, wake, plain = [], [], [], []
            for _ in range(samples):
                plain.append(_timed(lambda: _ok(client.post(CALL, headers=cookie)))[0])
                pause.append(_timed(lambda: _ok(client.post("/pause_session", headers=cookie)))[0])
                resume.append(_timed(lambda: _ok(client.post("/resume_session", headers=cookie)))[0])
                _ok(client.post("/pause_session", headers=cookie))
                ms, answer = _timed(lambda: _ok(client.post(CALL, headers=cookie)))
                if answer.headers.get(WOKEN_HEADER) != "resumed":
                    raise RuntimeError("the call to a paused node did not wake it")
                wake.append(ms)
            out.update(
                plain_ms=summary(plain),
                pause_ms=summary(pause),
                resume_ms=summary(resume),
                wake_resumed_ms=summary(wake),
            )
            if tier.name == "docker":
                out.update(_docker_pauses(state, samples))
            big = {"command": f"head -c {fork_mib}M /dev/urandom > big.bin && sync"}
            _ok(client.post("/commands", json=big, headers=cookie))
            forks = []
            for _ in range(max(2, samples // 3)):
                ms, answer = _timed(lambda: _ok(client.post("/fork_session", headers=cookie)))
                forks.append(ms)
                forked = {"Cookie": f"node_id={answer.cookies['node_id']}"}
                _ok(client.post("/release_session", headers=forked))
            out["fork_ms"] = summary(forks)
            workspace = _workspace_dir(tier, state)  # the same copy by hand, of the same data
            if workspace.is_dir():
                out["cp_ms"] = summary([_cp_reference(workspace) for _ in range(2)])
            _ok(client.post("/release_session", headers=cookie))
            out["wake_restarted_ms"] = summary(_restarts(manager, client, max(2, samples // 3)))
    finally:
        manager.stop()
    return out


def _restarts(manager: Manager, client: httpx.Client, samples: int) -> list[float]:
    """ms of a call to a node the checker stopped for idleness (a session with idle_seconds 1)."""
    resp = _ok(client.post("/get_cookie", json={"idle_seconds": 1}))
    cookie = {"Cookie": f"node_id={resp.cookies['node_id']}"}
    took = []
    for _ in range(samples):
        deadline = time.monotonic() + 60
        while manager.node(resp.cookies["node_id"])["status"] != "exited":
            if time.monotonic() > deadline:
                raise RuntimeError("the idle node was not stopped within 60 s")
            time.sleep(0.05)
        ms, answer = _timed(lambda: _ok(client.post(CALL, headers=cookie)))
        if answer.headers.get(WOKEN_HEADER) != "restarted":
            raise RuntimeError("the call to a stopped node did not restart it")
        took.append(ms)
    _ok(client.post("/release_session", headers=cookie))
    return took


def _docker_pauses(state: dict[str, Any], samples: int) -> dict[str, Any]:
    """Bare ``docker pause``/``docker unpause`` (the CLI) of the session's container."""
    container = str(state.get("container_id") or state.get("container"))
    pauses, unpauses = [], []
    for _ in range(samples):
        pauses.append(_docker_cli("pause", container))
        unpauses.append(_docker_cli("unpause", container))
    return {"docker_pause_ms": summary(pauses), "docker_unpause_ms": summary(unpauses)}


def _workspace_dir(tier: Tier, state: dict[str, Any]) -> Path:
    """The session's workspace on the host: its directory, or its Docker volume's."""
    if tier.name == "sandbox":  # on its mounted workspace image
        return Path(str(state.get("dir", ""))) / "disk" / "workspace"
    if tier.name != "docker":
        return Path(str(state.get("dir", ""))) / "workspace"
    found = subprocess.run(
        ["docker", "volume", "inspect", "-f", "{{.Mountpoint}}", str(state.get("volume"))],
        capture_output=True,
        text=True,
        check=False,
    )
    return Path(found.stdout.strip())


def run(ctx: Context) -> Outcome:
    outcome = Outcome(NAME, TITLE, method=__doc__ or "")
    samples = ctx.pick(10, 3)
    fork_mib = 100
    tiers = [PROCESS]
    if SANDBOX.unavailable():
        outcome.notes.append(f"sandbox tier skipped: {SANDBOX.unavailable()}")
    else:
        tiers.insert(0, SANDBOX)
    reason = dockerenv.unavailable_reason()
    if reason:
        outcome.notes.append(f"docker tier skipped: {reason}")
    else:
        tiers.append(DOCKER)
    if shutil.which("cp") is None:
        outcome.notes.append("no cp: the cp -a reference is missing")
    for tier in tiers:
        r = _measure(ctx, tier, samples, fork_mib)
        outcome.raw[tier.name] = r
        t = tier.name
        pause_ref = resume_ref = "the manager's own route"
        if "docker_pause_ms" in r:
            pause_ref = f"bare `docker pause` {r['docker_pause_ms']['p50']:.0f} ms"
            resume_ref = f"bare `docker unpause` {r['docker_unpause_ms']['p50']:.0f} ms"
        cp = f"bare `cp -a` of the workspace {r['cp_ms']['p50']:.0f} ms" if "cp_ms" in r else "no cp -a"
        outcome.add(
            Figure(NAME, f"{t}: pause_session p50", r["pause_ms"]["p50"], "ms", pause_ref),
            Figure(NAME, f"{t}: resume_session p50", r["resume_ms"]["p50"], "ms", resume_ref),
            Figure(
                NAME,
                f"{t}: call to a paused node (wake: resumed) p50",
                r["wake_resumed_ms"]["p50"],
                "ms",
                f"same call to a running node {r['plain_ms']['p50']:.1f} ms",
            ),
            Figure(
                NAME,
                f"{t}: call to an idle-stopped node (wake: restarted) p50",
                r["wake_restarted_ms"]["p50"],
                "ms",
                f"same call to a running node {r['plain_ms']['p50']:.1f} ms",
            ),
            Figure(NAME, f"{t}: fork_session, {fork_mib} MB workspace, p50", r["fork_ms"]["p50"], "ms", cp),
        )
    outcome.notes.append(
        f"{samples} pause/resume/wake samples per tier; forks of a {fork_mib} MiB ({fork_mib * MIB} bytes) "
        "workspace include the new node's start until healthy."
    )
    return outcome
