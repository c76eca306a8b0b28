"""Shared pieces: the run context, figures with targets and percentiles.

Ports, HTTP waits and the manager process come from :mod:`toolserver.testing`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
DOCS_DIR = REPO / "docs"
MIB = 1 << 20
GIB = 1 << 30


@dataclass
class Context:
    """What every benchmark gets: size of the run, a scratch dir, and switches."""

    quick: bool
    workdir: Path
    results_dir: Path
    profile: bool = False

    def pick(self, full: int, quick: int) -> int:
        return quick if self.quick else full


@dataclass
class Figure:
    """One row of the results table."""

    bench: str
    name: str
    value: float | None
    unit: str
    reference: str
    target: str = ""
    ok: bool | None = None  # None: no target (information only)
    note: str = ""

    @property
    def verdict(self) -> str:
        if self.ok is None:
            return "info" if self.value is not None else "SKIP"
        return "PASS" if self.ok else "MISS"

    def shown_value(self) -> str:
        return "—" if self.value is None else f"{fmt(self.value)} {self.unit}".strip()


@dataclass
class Outcome:
    """What one benchmark hands back: its figures, raw numbers, method text and notes."""

    name: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    method: str = ""
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None

    def add(self, *figures: Figure) -> None:
        self.figures.extend(figures)

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        for fig, item in zip(self.figures, out["figures"], strict=True):
            item["verdict"] = fig.verdict
        return out


def fmt(value: float) -> str:
    """A number with about three significant digits, no exponent."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    mag = abs(value)
    if mag >= 100:
        return f"{value:,.0f}"
    if mag >= 10:
        return f"{value:.1f}"
    if mag >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def node_address(record: Any) -> tuple[str, str | None]:
    """How to reach a session's node without the manager, from its record: a base URL, and the
    Unix socket to dial (a sandboxed node's; None: TCP)."""
    ip = str(record["ip"])
    if ip.startswith("unix:"):
        return "http://node", ip.removeprefix("unix:")
    return f"http://{ip}:{record['port']}", None


def percentile(values: Sequence[float], pct: float) -> float:
    """Linear-interpolated percentile (``pct`` in 0..100); NaN for no values."""
    if not values:
        return math.nan
    data = sorted(values)
    if len(data) == 1:
        return float(data[0])
    rank = (len(data) - 1) * pct / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(data) - 1)
    return float(data[lo] + (data[hi] - data[lo]) * (rank - lo))


def summary(values: Sequence[float]) -> dict[str, float]:
    """count, mean, p50, p95, p99, min and max of ``values``."""
    if not values:
        return {"count": 0}
    return {
        "count": len(values),
        "mean": sum(values) / len(values),
        "min": float(min(values)),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": float(max(values)),
    }


def at_most(value: float | None, limit: float) -> bool | None:
    return None if value is None or math.isnan(value) else value <= limit


def at_least(value: float | None, limit: float) -> bool | None:
    return None if value is None or math.isnan(value) else value >= limit
