"""Benchmark: a churn soak, the long version of the fault suite's one-minute soak (issue 8).

A real manager subprocess (process runtime, checker every 0.5 s) serves three clients that each
loop: ``/get_cookie``, three tool calls (calculator, shell ``echo``, a file write), ``/release_session``;
a probe session sends a request every 0.25 s and reads its record back, measuring how far
``last_req_time`` lags behind its last request; the manager's RSS and open descriptors are sampled
every 2 s (:func:`toolserver.testing.soak.soak`). Drift compares the medians of the first and the last
quarter of the samples after a 15 s warm-up. The log is searched for error and warning lines.
"""

from __future__ import annotations

from bench.common import Context, Figure, Outcome, at_most
from bench.procs import Manager
from toolserver.testing.soak import soak

NAME = "churn"
TITLE = "Churn soak: sessions created, used and released"
FLUSH_SECONDS = 1.0
WARMUP = 15.0


def run(ctx: Context) -> Outcome:
    outcome = Outcome(NAME, TITLE, method=__doc__ or "")
    seconds = ctx.pick(300, 30)
    with Manager(ctx.workdir / "churn" / "manager", node={"health_check_interval": 0.5}) as manager:
        started = len(manager.log().splitlines())  # the soak's lines, not the start-up's warnings
        report = soak(manager, seconds, clients=3)
        log = "\n".join(manager.log().splitlines()[started:])
    bad_lines = [line for line in log.splitlines() if " ERROR " in line or " WARNING " in line]
    rss, fds = report.drift(WARMUP)
    warm = [s for s in report.samples if s[0] >= WARMUP][:1] or report.samples[:1]
    outcome.raw = {
        "seconds": report.seconds,
        "sessions": report.sessions,
        "calls": report.calls,
        "failures": report.failures[:20],
        "max_lag_s": report.max_lag,
        "samples": report.samples,
        "log_error_lines": bad_lines[:20],
    }
    outcome.add(
        Figure(
            NAME,
            f"failed calls in {seconds} s",
            len(report.failures),
            "",
            f"{report.calls:,} calls",
            "0",
            len(report.failures) == 0,
            note=f"{report.sessions} sessions, {report.calls_per_second:.1f} calls/s",
        ),
        Figure(
            NAME,
            "last_req_time lag behind the last request (max)",
            report.max_lag,
            "s",
            f"flush interval {FLUSH_SECONDS:g} s",
            "≤ 2 s",
            at_most(report.max_lag, 2 * FLUSH_SECONDS),
        ),
        Figure(
            NAME,
            "manager RSS drift after warm-up",
            rss,
            "MiB",
            f"RSS after warm-up {warm[0][1]:.0f} MiB" if warm else "",
            "< 16 MiB",
            rss < 16,
        ),
        Figure(
            NAME,
            "manager open descriptors drift after warm-up",
            fds,
            "",
            f"{warm[0][2]} open after warm-up" if warm else "",
            "< 8",
            fds < 8,
        ),
        Figure(
            NAME, "error and warning lines in the manager log", len(bad_lines), "", "", "0", not bad_lines
        ),
    )
    return outcome
