"""A two-engine swarm on one machine: the machine's Docker Engine (the manager) and a second dockerd
in a network namespace the test creates, joined as a worker.

The second engine has its own data root, exec root and socket under a temporary directory, its
own bridge (``tsw<n>br``, made in its namespace: ``--bridge=none`` would delete the host's
``docker0``), no iptables rules, and an address on a veth pair (``10.231.<n>.2``, the host end
``10.231.<n>.1``). It runs under ``nsenter --net`` rather than ``ip netns exec``, which remounts
``/sys`` and hides the cgroup hierarchy dockerd needs. The node image is copied to it with
``docker save | docker load`` (the image id stays the same). Everything is removed afterwards, and
the machine's engine is put back in the swarm state the test session had.

:func:`swarm_on_veth` alone is the one-host swarm the stack deploy test uses (its managers run in
containers, which must reach the nodes at the swarm's address).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from toolserver.testing import wait_until
from toolserver.testing.swarm import SESSION, swarm_state


def _run(*argv: str, timeout: float = 60, check: bool = True, stdin: str | None = None) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=stdin)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def docker(*args: str, timeout: float = 120, check: bool = True, stdin: str | None = None) -> str:
    """The machine's docker CLI: its stdout (RuntimeError with its message when it fails and ``check``)."""
    return _run("docker", *args, timeout=timeout, check=check, stdin=stdin)


@dataclass
class SecondEngine:
    root: Path
    netns: str
    address: str
    host_address: str
    swarm_node: str = ""
    pid: int = 0

    @property
    def socket(self) -> str:
        return f"unix://{self.root}/docker.sock"

    def docker(self, *args: str, timeout: float = 60, check: bool = True) -> str:
        return _run("docker", "-H", self.socket, *args, timeout=timeout, check=check)

    def start(self) -> None:
        log = (self.root / "dockerd.log").open("ab")
        argv = [
            "nsenter",
            f"--net=/run/netns/{self.netns}",
            "dockerd",
            "--data-root",
            str(self.root / "data"),
        ]
        argv += ["--exec-root", str(self.root / "exec"), "--pidfile", str(self.root / "dockerd.pid")]
        argv += ["-H", self.socket, "--bridge", f"{self.netns}br", "--iptables=false", "--ip-masq=false"]
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.pid = proc.pid
        version = ("version", "--format", "{{.Server.Version}}")
        wait_until(lambda: self.docker(*version, check=False, timeout=10).strip(), timeout=60, what="dockerd")

    def stop(self) -> None:
        """Stop the engine (its containers with it) and wait until it is gone."""
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            with contextlib.suppress(ChildProcessError):
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    pid, _ = os.waitpid(self.pid, os.WNOHANG)
                    if pid:
                        break
                    time.sleep(0.1)
            self.pid = 0


def why_not() -> str | None:
    """Why a second engine cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, a second dockerd)"
    for tool in ("ip", "nsenter", "dockerd", "docker"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    state = swarm_state()
    if state is None:
        return "the Docker Engine does not answer"
    if state[0] == "active" and not SESSION.initialised:
        return "the Docker Engine is in a swarm this test session did not make"
    return None


@contextlib.contextmanager
def swarm_on_veth(netns: str, index: int) -> Iterator[str]:
    """The machine's engine as the manager of a swarm that advertises ``10.231.<index>.1``, the host
    end (``<netns>h``) of a veth pair whose other end (``<netns>n``, ``10.231.<index>.2``, a default
    route back) is in the new network namespace ``netns``. Containers reach that address, unlike
    127.0.0.1. Yields it; afterwards the swarm is as the test session had it and the pair is gone."""
    host_address, inside_address = f"10.231.{index}.1", f"10.231.{index}.2"
    had_swarm = SESSION.initialised
    host_if, inside_if = f"{netns}h", f"{netns}n"
    try:
        _run("ip", "netns", "add", netns)
        _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", inside_if)
        _run("ip", "link", "set", inside_if, "netns", netns)
        _run("ip", "addr", "add", f"{host_address}/24", "dev", host_if)
        _run("ip", "link", "set", host_if, "up")
        inside = ["ip", "netns", "exec", netns, "ip"]
        _run(*inside, "addr", "add", f"{inside_address}/24", "dev", inside_if)
        _run(*inside, "link", "set", inside_if, "up")
        _run(*inside, "link", "set", "lo", "up")
        _run(*inside, "route", "add", "default", "via", host_address)
        if not SESSION.reinit(host_address):
            raise RuntimeError(f"docker swarm init --advertise-addr {host_address}: {SESSION.error}")
        yield host_address
    finally:
        if had_swarm:
            SESSION.reinit("127.0.0.1")
        else:
            SESSION.restore()
        _run("ip", "netns", "del", netns, check=False)
        _run("ip", "link", "del", host_if, check=False)


@contextlib.contextmanager
def two_engine_swarm(image: str, index: int = 0) -> Iterator[SecondEngine]:
    """The machine's engine as swarm manager at ``10.231.<index>.1`` and a second one as worker."""
    netns = f"tsw{os.getpid() % 1000}x{index}"
    root = Path(tempfile.mkdtemp(prefix="toolserver-engine2-"))
    engine = SecondEngine(root, netns, f"10.231.{index}.2", f"10.231.{index}.1")
    try:
        with swarm_on_veth(netns, index):
            try:
                inside = ["ip", "netns", "exec", netns, "ip"]
                _run(*inside, "link", "add", f"{netns}br", "type", "bridge")
                _run(*inside, "addr", "add", f"10.232.{index}.1/24", "dev", f"{netns}br")
                _run(*inside, "link", "set", f"{netns}br", "up")
                engine.start()
                token = _run("docker", "swarm", "join-token", "-q", "worker").strip()
                manager = f"{engine.host_address}:2377"
                engine.docker("swarm", "join", "--advertise-addr", engine.address, "--token", token, manager)
                engine.swarm_node = engine.docker("info", "--format", "{{.Swarm.NodeID}}").strip()
                # a stopped worker is marked down after a few heartbeats: make them 1 s (our swarm only)
                _run("docker", "swarm", "update", "--dispatcher-heartbeat", "1s")
                save = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
                try:
                    load = ["docker", "-H", engine.socket, "load", "-q"]
                    loaded = subprocess.run(load, stdin=save.stdout, capture_output=True, timeout=600)
                finally:
                    save.wait(600)
                if loaded.returncode != 0:
                    why = loaded.stderr.decode(errors="replace")
                    raise RuntimeError(f"docker load on the second engine: {why}")
                yield engine
            finally:
                with contextlib.suppress(Exception):
                    engine.docker("swarm", "leave", "--force", timeout=30, check=False)
                engine.stop()
                if engine.swarm_node:
                    _run("docker", "node", "rm", "--force", engine.swarm_node, check=False)
    finally:
        for line in reversed(Path("/proc/mounts").read_text().splitlines()):
            where = line.split()[1]
            if where.startswith(str(root)):
                _run("umount", "-l", where, check=False)
        shutil.rmtree(root, ignore_errors=True)
