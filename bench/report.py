"""The results: a console table, ``docs/benchmarks.md`` and a JSON of the raw numbers."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

from bench.common import Figure, Outcome

HEADERS = ("Figure", "Value", "Reference (same run)", "Target", "Result")
PLOT_NAME = "session_ready.png"
DENSITY_PLOT_NAME = "density.png"


def _row(fig: Figure) -> tuple[str, str, str, str, str]:
    name = fig.name + (f" ({fig.note})" if fig.note else "")
    return name, fig.shown_value(), fig.reference, fig.target or "—", fig.verdict


def console_table(outcomes: list[Outcome], width: int = 200) -> str:
    rows: list[tuple[str, ...]] = []
    for outcome in outcomes:
        rows.append((f"[{outcome.title}]", "", "", "", ""))
        if outcome.error:
            rows.append((f"ERROR: {outcome.error}", "", "", "", "FAIL"))
        rows.extend(_row(f) for f in outcome.figures)
    caps = (86, 12, 56, 14, 6)
    widths = [
        min(cap, max(len(h), *(len(r[i]) for r in rows)))
        for i, (h, cap) in enumerate(zip(HEADERS, caps, strict=True))
    ]

    def line(cells: tuple[str, ...]) -> str:
        parts = []
        for cell, w in zip(cells, widths, strict=True):
            text = cell if len(cell) <= w else cell[: w - 1] + "…"
            parts.append(text.ljust(w))
        return "  ".join(parts).rstrip()[:width]

    out = [line(HEADERS), line(tuple("-" * w for w in widths))]
    out += [line(r) for r in rows]
    return "\n".join(out)


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(outcomes: list[Outcome], machine: dict[str, Any], command: str, plot: str | None) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Latest full run of the benchmark suite (`bench/`, issue 5). Every figure was measured in the same",
        "run as its reference. This file and the plot are written by the run itself; the raw numbers",
        "are in `bench/results/` (not committed). What the figures mean, the runs too long for this",
        "suite (1,000 sessions) and the profiles behind the misses are in [performance.md](performance.md).",
        "",
        f"* **Date:** {machine['date']}",
        f"* **Command:** `{command}` (it runs `.venv/bin/python -m bench`)",
        f"* **Machine:** {machine['nproc']} cores ({machine['cpu']}), {machine['ram_gib']} GiB RAM, "
        f"{machine['os']}, Python {machine['python']}",
        f"* **Load average at the start:** {', '.join(str(x) for x in machine['load_average'])} "
        "(other work on the machine makes the numbers noisier)",
        f"* **Commit:** {machine['commit']}; nginx: {machine['nginx']}; Docker Engine: {machine['docker']}",
        "* **2 cores only:** the load generator, the proxies, the manager and the nodes all share them.",
        "",
        "## Results",
        "",
        "| Benchmark | Figure | Value | Reference (same run) | Target | Result |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for outcome in outcomes:
        if outcome.error:
            lines.append(f"| {outcome.title} | error: {_md(outcome.error)} | | | | FAIL |")
        for fig in outcome.figures:
            name, value, ref, target, verdict = (_md(c) for c in _row(fig))
            shown = f"**{verdict}**" if verdict in ("PASS", "MISS") else verdict
            lines.append(f"| {outcome.title} | {name} | {value} | {ref} | {target} | {shown} |")
    lines.append("")
    if plot:
        lines += [f"![Session ready: warm-pool hit vs cold start]({plot})", ""]
    lines += ["## Notes", ""]
    for outcome in outcomes:
        for note in outcome.notes:
            first, *rest = note.splitlines()
            lines.append(f"* **{outcome.title}:** {first}")
            if rest:
                lines += ["", "  ```", *(f"  {r}" for r in rest), "  ```", ""]
    lines += ["", "## Method", ""]
    for outcome in outcomes:
        lines += [f"### {outcome.title} (`bench/{_module(outcome.name)}.py`)", ""]
        lines += [textwrap.dedent(outcome.method).strip(), ""]
    lines += [
        "## Running it",
        "",
        "```",
        "make bench                          # everything, about 30 minutes; writes this file",
        ".venv/bin/python -m bench --quick    # smaller counts, for development (docs untouched)",
        ".venv/bin/python -m bench only proxy memory",
        ".venv/bin/python -m bench --profile  # py-spy on the manager during the targeted runs",
        "```",
        "",
        "Optional tools: `pip install -e '.[bench]'` (matplotlib for the plot, py-spy for profiles);",
        "nginx is installed from Debian's package by `bench/install_nginx.sh` when it is missing.",
        "",
    ]
    return "\n".join(lines)


def _module(name: str) -> str:
    return {"checker": "checker_cost"}.get(name, name)


def write_json(path: Path, outcomes: list[Outcome], machine: dict[str, Any], argv: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"machine": machine, "argv": argv, "benchmarks": [o.as_json() for o in outcomes]}
    path.write_text(json.dumps(data, indent=1, default=str))
