"""The escape suite's world: one manager per tier, and two sessions, the attacker's and its victim's.

The harness (this file) may look at the host: it reads the victim's cookie, secret, address and
runtime state from the manager's database, and the host pids of its node, so that the attacker's
probe knows exactly what to go for. The attacker itself only has its session: its shell and its
file tools.
"""

from __future__ import annotations

import json
import shlex
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support import ManagerProcess, docker_containers, docker_volumes
from toolserver.client import ToolServerClient
from toolserver.client.sync import Session
from toolserver.runtimes.base import LABEL_MANAGER
from toolserver.testing.tiers import Tier, tiers

PROBE = (Path(__file__).parent / "probe.py").read_text()
#: node limits of the escape suite's managers (small, so that the hogs hit them fast)
RESOURCES = {"memory": "256m", "cpus": 1.0, "pids_limit": 128}
#: tier-specific keys that give a node a workspace size limit
DISK_LIMITS: dict[str, dict[str, Any]] = {
    "sandbox": {"workspace_size": "64m"},
    "docker": {"workspace_size": "64m"},
    "gvisor": {"workspace_size": "64m"},
}
UNCONFINED = "the process tier confines nothing: nodes run as the manager's user on the host"


#: Known gaps of a tier, by check: expected failures (strict), reported as XFAIL with the reason.
GAPS = {
    ("swarm", "connect"): "swarm tier: a host-mode published port listens on every address of the "
    "engine's host (Swarm's port config has no host IP), so a node reaches another through the gateway; "
    "and service tasks share the default bridge, inter-container traffic on, so it reaches the other's "
    "container address too",
    ("swarm", "disk"): "swarm tier: no workspace size limit yet (runtime_config.workspace_size is "
    "Docker and gVisor only)",
}


def escape_params(
    *, confined_everywhere: bool = False, run_on_process: bool = True, check: str = ""
) -> list[Any]:
    """The tiers as params; on ``process`` the check is an expected failure (strict), unless it
    holds there too (``confined_everywhere``). ``run_on_process=False``: not even run there (it
    would load the shared machine, nothing stops it). ``check`` names the check for :data:`GAPS`."""
    params = []
    for tier in tiers():
        param = tier.param()
        marks = list(param.marks)
        if tier.name == "process" and not confined_everywhere:
            marks.append(pytest.mark.xfail(strict=True, run=run_on_process, reason=UNCONFINED))
        elif (tier.name, check) in GAPS:
            marks.append(pytest.mark.xfail(strict=True, reason=GAPS[tier.name, check]))
        params.append(pytest.param(tier, id=tier.name, marks=marks))
    return params


@dataclass
class Victim:
    """What the harness knows of the victim session (never given to the attacker's session)."""

    cookie: str
    secret: str
    short_id: str
    address: list[str]
    state: dict[str, Any]
    pids: list[int]
    canary: str
    roots: list[str] = field(default_factory=list)


@dataclass
class World:
    tier: Tier
    manager: ManagerProcess
    client: ToolServerClient
    attacker: Session
    victim_session: Session
    victim: Victim

    def probe(self, *args: str, session: Session | None = None, timeout: float = 120) -> dict[str, Any]:
        """Run the probe in the attacker's node; its JSON answer."""
        who = session or self.attacker
        result = who.run(f"python3 probe.py {shlex.join(args)}", timeout=timeout)
        assert result.exit_code == 0, result.stderr + result.stdout
        return json.loads(result.stdout.strip().splitlines()[-1])

    def still_fine(self) -> None:
        """The manager and the victim's session keep answering."""
        assert self.client.list_sessions() is not None
        assert self.victim_session.run("echo alive", timeout=60).stdout.strip() == "alive"


def record(db: Path, cookie: str) -> dict[str, Any]:
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        row = conn.execute("SELECT * FROM toolserver_nodes WHERE id = ?", (cookie,)).fetchone()
    record = dict(row)
    state = record["runtime_state"]
    record["runtime_state"] = json.loads(state) if isinstance(state, str) else state
    return record


def _host_pids(tier: Tier, record: dict[str, Any]) -> list[int]:
    """The host pids of a node: the container's init (Docker tiers), else the node server's."""
    state = record["runtime_state"]
    if state.get("container_id"):
        out = subprocess.run(
            ["docker", "inspect", "-f", "{{.State.Pid}}", state["container_id"]],
            capture_output=True,
            text=True,
            timeout=30,
        )
        pid = int(out.stdout.strip() or 0)
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))] if pid else []
    return [p.pid for p in psutil.process_iter() if _has_secret(p, record["secret"])]


def _has_secret(proc: psutil.Process, secret: str) -> bool:
    try:
        return secret in proc.environ().values()
    except psutil.Error:
        return False


def _addresses(record: dict[str, Any]) -> list[str]:
    """Where the victim's node can be reached: its record's address, and its container's IPs."""
    state = record["runtime_state"]
    found = []
    if str(record.get("ip", "")).startswith("unix:"):
        found.append(str(record["ip"]))
    elif record.get("port"):
        found.append(f"{record['ip']}:{record['port']}")
    for value in state.values():
        if isinstance(value, str) and value.startswith("unix:"):
            found.append(value)
    containers = [state["container_id"]] if state.get("container_id") else []
    if state.get("service_id"):  # a swarm node: its task's container, on this engine
        label = f"label=com.docker.swarm.service.id={state['service_id']}"
        ps = ["docker", "ps", "-q", "--filter", label]
        containers += subprocess.run(ps, capture_output=True, text=True, timeout=30).stdout.split()
    for container in containers:
        ips = "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}"
        out = subprocess.run(
            ["docker", "inspect", "-f", ips, container], capture_output=True, text=True, timeout=30
        )
        found += [f"{ip}:31942" for ip in out.stdout.split()]
    return found


def _roots(manager: ManagerProcess, record: dict[str, Any]) -> list[str]:
    """Host directories that hold the victim's workspace, secret and records."""
    roots = [str(manager.root)]
    state = record["runtime_state"]
    roots += [v for v in state.values() if isinstance(v, str) and v.startswith("/")]
    if state.get("volume"):
        roots.append(f"/var/lib/docker/volumes/{state['volume']}/_data")
    return roots


@pytest.fixture(scope="module")
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tier: Tier = request.param
    config = tier.manager_config()
    config["runtime_config"] = {**config["runtime_config"], **DISK_LIMITS.get(tier.name, {})}
    root = tmp_path_factory.mktemp(f"escape-{tier.name}")
    manager = ManagerProcess(root, **config, node={"resources": RESOURCES, "creation_wait_seconds": 90})
    manager.start()
    client = ToolServerClient(manager.url, timeout=120)
    try:
        victim_session = client.create_session()
        attacker = client.create_session()
        canary = f"victim-canary-{uuid.uuid4().hex}"
        victim_session.files.write("diary.txt", canary)
        attacker.files.write("probe.py", PROBE)
        row = record(manager.db_path, victim_session.session_id)
        victim = Victim(
            cookie=victim_session.session_id,
            secret=row["secret"],
            short_id=row["short_id"],
            address=_addresses(row),
            state=row["runtime_state"],
            pids=_host_pids(tier, row),
            canary=canary,
            roots=_roots(manager, row),
        )
        yield World(tier, manager, client, attacker, victim_session, victim)
        for session in (attacker, victim_session):
            session.release()
    finally:
        client.close()
        manager.stop()
        left = _leftovers(tier, manager)
        assert left == [], f"the escape suite left {left}"


def _leftovers(tier: Tier, manager: ManagerProcess) -> list[str]:
    """Containers, volumes, networks and workspace mounts of this manager still there (then removed)."""
    label = f"{LABEL_MANAGER}={manager.manager_id}"
    containers, volumes, networks = [], [], []
    if "docker" in tier.marks:
        containers, volumes = docker_containers(label), docker_volumes(label)
        networks = subprocess.run(
            ["docker", "network", "ls", "-q", "--filter", f"label={label}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout.split()
    for row in containers:
        subprocess.run(["docker", "rm", "-f", row["id"]], capture_output=True, check=False)
    for volume in volumes:
        subprocess.run(["docker", "volume", "rm", "-f", volume], capture_output=True, check=False)
    mounts = [p for p in psutil.disk_partitions(all=True) if p.mountpoint.startswith(str(manager.root))]
    for part in mounts:
        subprocess.run(["umount", "-l", part.mountpoint], capture_output=True, check=False)
    for net in networks:
        subprocess.run(["docker", "network", "rm", net], capture_output=True, check=False)
    return (
        [f"container {c['id'][:12]}" for c in containers]
        + volumes
        + [f"network {n}" for n in networks]
        + [m.mountpoint for m in mounts]
    )
