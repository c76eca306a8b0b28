"""``python -m bench [--quick] [--profile] [only NAME ...]``: run the benchmarks, print the table.

A full run (every benchmark, no ``--quick``) also writes ``docs/benchmarks.md`` and
``docs/session_ready.png``; every run writes its raw results to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

from bench import (
    checker_cost,
    checker_docker,
    churn,
    cluster,
    density,
    first_byte,
    keycheck,
    lifecycle,
    limits,
    machine,
    mcp,
    memory,
    plot,
    proxy,
    report,
    session_ready,
    streaming,
    upstream,
)
from bench.common import DOCS_DIR, RESULTS_DIR, Context, Outcome
from bench.procs import cleanup_all, install_signal_handlers

BENCHMARKS: dict[str, ModuleType] = {
    m.NAME: m
    for m in (
        session_ready,
        proxy,
        keycheck,
        upstream,
        mcp,
        streaming,
        first_byte,
        checker_cost,
        checker_docker,
        memory,
        limits,
        churn,
        lifecycle,
        cluster,
        density,
    )
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="ToolServer benchmarks: " + ", ".join(BENCHMARKS) + ".",
        epilog="examples: python -m bench --quick;  python -m bench only proxy memory",
    )
    parser.add_argument("what", nargs="*", help="'only NAME...' to run some benchmarks; 'list' to list them")
    parser.add_argument("--quick", action="store_true", help="smaller counts (development); docs untouched")
    parser.add_argument("--profile", action="store_true", help="py-spy on the manager during targeted runs")
    parser.add_argument(
        "--write-docs", action="store_true", help="write docs/benchmarks.md even for a partial or quick run"
    )
    parser.add_argument("--no-docs", action="store_true", help="never write docs/benchmarks.md")
    return parser


def _select(what: list[str], parser: argparse.ArgumentParser) -> list[str]:
    if not what:
        return list(BENCHMARKS)
    if what[0] == "only" and len(what) > 1:
        unknown = [n for n in what[1:] if n not in BENCHMARKS]
        if unknown:
            parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
        return [n for n in BENCHMARKS if n in what[1:]]
    parser.error("usage: python -m bench [only NAME ...] | list")
    return []


def _run_one(name: str, ctx: Context) -> Outcome:
    module = BENCHMARKS[name]
    print(f"==> {module.TITLE} ({name})", flush=True)
    started = time.monotonic()
    try:
        outcome: Outcome = module.run(ctx)
    except Exception as exc:
        traceback.print_exc()
        outcome = Outcome(
            name, module.TITLE, method=module.__doc__ or "", error=f"{type(exc).__name__}: {exc}"
        )
    finally:
        leftovers = cleanup_all()
    if leftovers:
        outcome.notes.append(f"cleanup had to kill {len(leftovers)} leftover process(es)")
    outcome.seconds = time.monotonic() - started
    print(f"    done in {outcome.seconds:.0f} s", flush=True)
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.what == ["list"]:
        for name, module in BENCHMARKS.items():
            print(f"{name:15s} {module.TITLE}")
        return 0
    names = _select(args.what, parser)
    install_signal_handlers()
    host = machine.describe()
    workdir = Path(tempfile.mkdtemp(prefix="toolserver-bench-"))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    ctx = Context(quick=args.quick, workdir=workdir, results_dir=RESULTS_DIR, profile=args.profile)
    outcomes: list[Outcome] = []
    try:
        for name in names:
            outcomes.append(_run_one(name, ctx))
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
        cleanup_all()
        return 130
    finally:
        cleanup_all()
        shutil.rmtree(workdir, ignore_errors=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    mode = "quick" if args.quick else "full"
    json_path = RESULTS_DIR / f"{stamp}-{mode}.json"
    report.write_json(json_path, outcomes, host, sys.argv)
    shutil.copyfile(json_path, RESULTS_DIR / "latest.json")
    print()
    print(report.console_table(outcomes))
    for outcome in outcomes:
        for note in outcome.notes:
            print(f"\n[{outcome.title}] {note}")
    full = not args.quick and names == list(BENCHMARKS)
    if not args.no_docs and (full or args.write_docs):
        _write_docs(outcomes, host)
    print(f"\nraw results: {json_path.relative_to(RESULTS_DIR.parent.parent)}")
    return 1 if any(o.error for o in outcomes) else 0


def _write_docs(outcomes: list[Outcome], host: dict[str, object]) -> None:
    plot_name: str | None = None
    ready = next((o for o in outcomes if o.name == session_ready.NAME and o.raw), None)
    if ready is not None:
        why = plot.session_ready_png(ready.raw, DOCS_DIR / report.PLOT_NAME)
        if why is None:
            plot_name = report.PLOT_NAME
        else:
            ready.notes.append(why)
    dense = next((o for o in outcomes if o.name == density.NAME and o.raw), None)
    if dense is not None:
        why = plot.density_png(dense.raw, DOCS_DIR / report.DENSITY_PLOT_NAME)
        if why is not None:
            dense.notes.append(why)
    command = "make bench"
    text = report.markdown(outcomes, host, command, plot_name)
    if dense is not None and (DOCS_DIR / report.DENSITY_PLOT_NAME).exists():
        text += f"\n![Density: memory and /alive latency against live sessions]({report.DENSITY_PLOT_NAME})\n"
    (DOCS_DIR / "benchmarks.md").write_text(text)
    print(f"wrote {DOCS_DIR / 'benchmarks.md'}" + (f" and {DOCS_DIR / plot_name}" if plot_name else ""))


if __name__ == "__main__":
    raise SystemExit(main())
