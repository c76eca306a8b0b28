"""ToolServer's benchmark suite (issue 5): ``python -m bench`` runs every benchmark.

Each benchmark module exposes ``NAME``, ``TITLE`` and ``run(ctx) -> Outcome``; every figure it
reports is measured in the same run as its reference. ``bench.report`` prints the table, writes
``docs/benchmarks.md`` (with the plot) and a JSON of the raw results to ``bench/results/``.
"""
