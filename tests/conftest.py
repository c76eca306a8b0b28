from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import ManagerProcess
from toolserver.testing.swarm import SESSION as _SWARM


def pytest_configure(config: pytest.Config) -> None:
    """Put the Docker Engine in swarm mode for the swarm tier, unless the run leaves Docker out
    (``-m "not docker"`` or ``not swarm``); it is left again at the end if this session did it."""
    expr = config.getoption("markexpr", "") or ""
    if "not docker" in expr or "not swarm" in expr or config.getoption("collectonly", False):
        return
    _SWARM.ensure()


def pytest_unconfigure(config: pytest.Config) -> None:
    _SWARM.restore()


@pytest.fixture
def manager_factory(tmp_path: Path) -> Iterator[Callable[..., ManagerProcess]]:
    """Start real manager processes; on teardown none of their processes may be left running."""
    made: list[ManagerProcess] = []

    def make(start: bool = True, **config: Any) -> ManagerProcess:
        manager = ManagerProcess(tmp_path / f"manager{len(made)}", **config)
        made.append(manager)
        return manager.start() if start else manager

    yield make
    # stop every manager before looking for leftovers: managers may share a data directory
    for manager in reversed(made):
        manager.stop()
    leaks = [(m.root, p.pid) for m in made for p in m.cleanup()]
    assert not leaks, f"processes left running after the test: {leaks}"


@pytest.fixture
def manager(manager_factory: Callable[..., ManagerProcess]) -> ManagerProcess:
    return manager_factory()
