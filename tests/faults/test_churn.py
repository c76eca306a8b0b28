"""A bounded churn soak: several clients creating, using and releasing sessions for a minute.

Zero failed calls, last request times never more than two flush intervals behind, no error or
warning line in the manager's log, the manager's memory and open descriptors flat, and nothing
left behind (``make bench`` runs the same soak for longer).
"""

from __future__ import annotations

from pathlib import Path

from tests.faults.harness import TICK, error_lines, fault_managers, recovered
from toolserver.testing.soak import soak
from toolserver.testing.tiers import PROCESS

SECONDS = 60
#: the activity buffer's flush interval
FLUSH = 1.0


def test_churn_soak(tmp_path: Path) -> None:
    with fault_managers(tmp_path) as make:
        manager = make(PROCESS)
        started = len(manager.log().splitlines())  # past the start-up (the tier's own warning)
        report = soak(manager, SECONDS, clients=3)
        rss, fds = report.drift(warmup=15)
        print(
            f"\n[churn] {report.sessions} sessions, {report.calls} calls ({report.calls_per_second:.1f}/s), "
            f"lag ≤ {report.max_lag:.2f} s, RSS drift {rss:+.1f} MiB, descriptors {fds:+d}"
        )
        assert report.failures == []
        assert report.sessions >= 10
        assert report.max_lag <= 2 * FLUSH
        assert rss < 16, report.samples
        assert fds < 8, report.samples
        recovered(manager, within=TICK * 2)
        assert error_lines("\n".join(manager.log().splitlines()[started:])) == []
