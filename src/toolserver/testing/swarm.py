"""Swarm mode for tests and benchmarks: put the local Docker Engine in swarm mode if it is not, and
leave it as it was found afterwards.

:class:`SwarmMode` runs ``docker swarm init --advertise-addr 127.0.0.1`` only when the engine is
inactive (a single-node swarm whose node address is loopback, so nodes' host-mode ports are
reached on 127.0.0.1), and on :meth:`SwarmMode.restore` runs ``docker swarm leave --force`` and
removes the ``docker_gwbridge`` network that swarm mode made, only if it initialised the swarm.
An engine that already was a swarm (a manager or a worker) is never touched.
"""

from __future__ import annotations

import json
import subprocess

__all__ = ["SESSION", "SwarmMode", "swarm_state"]


def _docker(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


def swarm_state() -> tuple[str, bool] | None:
    """(LocalNodeState, ControlAvailable) of the local engine, or None when it does not answer."""
    try:
        done = _docker("info", "--format", "{{json .Swarm}}", timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    swarm = json.loads(done.stdout or "{}")
    return str(swarm.get("LocalNodeState", "")), bool(swarm.get("ControlAvailable"))


class SwarmMode:
    """Swarm mode while needed; see the module docstring."""

    def __init__(self) -> None:
        self.initialised = False
        self._had_gwbridge = False
        self.error: str | None = None

    def reinit(self, advertise: str) -> bool:
        """Make a swarm advertising ``advertise``, replacing the one :meth:`ensure` made (if any);
        False when the engine is in a swarm this object did not make."""
        state = swarm_state()
        if state is None or (state[0] == "active" and not self.initialised):
            return False
        if self.initialised:
            _docker("swarm", "leave", "--force")
        else:
            self._had_gwbridge = _docker("network", "inspect", "docker_gwbridge").returncode == 0
        done = _docker("swarm", "init", "--advertise-addr", advertise)
        self.initialised = done.returncode == 0
        self.error = None if self.initialised else done.stderr.strip()
        return self.initialised

    def ensure(self) -> bool:
        """Make the engine a swarm manager if it is inactive; False (and :attr:`error`) if it cannot."""
        state = swarm_state()
        if state is None:
            self.error = "Docker Engine unreachable"
            return False
        if state[0] == "active":
            if not state[1]:
                self.error = "the engine is a swarm worker, not a manager"
            return state[1]
        if state[0] != "inactive":
            self.error = f"the engine's swarm state is {state[0]!r}"
            return False
        self._had_gwbridge = _docker("network", "inspect", "docker_gwbridge").returncode == 0
        done = _docker("swarm", "init", "--advertise-addr", "127.0.0.1")
        if done.returncode != 0:
            self.error = f"docker swarm init failed: {done.stderr.strip()}"
            return False
        self.initialised = True
        return True

    def restore(self) -> None:
        """Leave the swarm and remove its bridge, if :meth:`ensure` made them."""
        if not self.initialised:
            return
        _docker("swarm", "leave", "--force")
        if not self._had_gwbridge:
            _docker("network", "rm", "docker_gwbridge")
        self.initialised = False


#: The test session's swarm mode (tests/conftest.py turns it on and off).
SESSION = SwarmMode()
