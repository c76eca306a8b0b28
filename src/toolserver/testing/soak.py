"""A bounded churn soak against a real manager: clients creating, using and releasing sessions.

Used by the fault suite (60 s) and by ``make bench`` (longer). Besides the calls of the churning
clients, one *probe* session sends a request every :data:`PROBE_EVERY` seconds and reads its
record back, to measure how far the record's ``last_req_time`` lags behind the last request; and
the manager's memory and open descriptors are sampled throughout.

    with ManagerProcess(tmp_path) as manager:
        report = soak(manager, seconds=60)
        assert not report.failures
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import psutil

from toolserver.client import ToolServerClient
from toolserver.testing import ManagerProcess

PROBE_EVERY = 0.25
SAMPLE_EVERY = 2.0
CALC = ("calculator", {"expression": "6*7"})
SHELL = ("shell_command_executor", {"command": "echo churn"})
WRITE = ("FileSystemEnv_write_to_file", {"filepath": "churn.txt", "content": "churn"})


@dataclass
class SoakReport:
    seconds: float = 0.0
    sessions: int = 0
    calls: int = 0
    failures: list[str] = field(default_factory=list)
    #: largest gap seen between the probe's last request and its record's last_req_time (seconds)
    max_lag: float = 0.0
    #: (seconds since start, RSS in MiB, open descriptors) of the manager process
    samples: list[tuple[float, float, int]] = field(default_factory=list)

    def drift(self, warmup: float) -> tuple[float, int]:
        """Growth of RSS (MiB) and descriptors from just after ``warmup`` to the end (medians of
        the first and the last few samples)."""
        after = [s for s in self.samples if s[0] >= warmup]
        if len(after) < 4:
            return 0.0, 0
        k = max(2, len(after) // 4)
        first, last = after[:k], after[-k:]
        rss = statistics.median(s[1] for s in last) - statistics.median(s[1] for s in first)
        fds = statistics.median(s[2] for s in last) - statistics.median(s[2] for s in first)
        return rss, int(fds)

    @property
    def calls_per_second(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def soak(manager: ManagerProcess, seconds: float, clients: int = 3, calls_per_session: int = 3) -> SoakReport:
    """Churn sessions on ``manager`` for ``seconds``; every failed call is a line of ``failures``."""
    report = SoakReport()
    lock = threading.Lock()
    stop = threading.Event()
    started = time.monotonic()

    def failed(what: str, exc: BaseException) -> None:
        with lock:
            report.failures.append(f"{what}: {type(exc).__name__}: {exc}")

    def churn() -> None:
        with ToolServerClient(manager.url, timeout=120) as client:
            while not stop.is_set():
                try:
                    session = client.get_cookie()
                except Exception as exc:
                    failed("get_cookie", exc)
                    continue
                done = 0
                try:
                    for i in range(calls_per_session):
                        tool, args = (CALC, SHELL, WRITE)[i % 3]
                        session.execute_tool(tool, args)
                        done += 1
                except Exception as exc:
                    failed("execute_tool", exc)
                try:
                    session.release()
                except Exception as exc:
                    failed("release_session", exc)
                with lock:
                    report.sessions += 1
                    report.calls += done + 2

    def probe() -> None:
        with ToolServerClient(manager.url, timeout=120) as client:
            session = client.get_cookie()
            try:
                while not stop.wait(PROBE_EVERY):
                    sent = _utcnow()
                    try:
                        session.execute_tool(*CALC)
                    except Exception as exc:
                        failed("probe", exc)
                        continue
                    record = manager.node(session.node_id)
                    written = datetime.fromisoformat(str(record["last_req_time"])) if record else sent
                    with lock:
                        report.calls += 1
                        report.max_lag = max(report.max_lag, (sent - written).total_seconds())
            finally:
                session.release()

    def sample() -> None:
        proc = psutil.Process(manager.pid)
        while True:
            mem = proc.memory_info().rss / (1 << 20)
            report.samples.append((time.monotonic() - started, mem, proc.num_fds()))
            if stop.wait(SAMPLE_EVERY):
                return

    threads = [threading.Thread(target=churn, name=f"churn-{i}") for i in range(clients)]
    threads += [threading.Thread(target=probe, name="probe"), threading.Thread(target=sample, name="sample")]
    for t in threads:
        t.start()
    try:
        time.sleep(seconds)
    finally:
        stop.set()
        for t in threads:
            t.join(180)
    report.seconds = time.monotonic() - started
    return report


__all__ = ["SoakReport", "soak"]
