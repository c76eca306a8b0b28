from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import ManagerProcess


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
