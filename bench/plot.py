"""The session-ready latency distribution (warm vs cold) and the density curve as PNGs, with matplotlib if
installed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

STYLES = {"process": "-", "docker": "--"}
COLORS = {"warm": "tab:green", "cold": "tab:blue"}


def session_ready_png(raw: dict[str, Any], out: Path) -> str | None:
    """Write the CDF plot; returns None on success, else why it was not drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'); no plot"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    drawn = False
    for ax, key, title in (
        (axes[0], "cookie_ms", "/get_cookie answered"),
        (axes[1], "ready_ms", "session ready: first execute_tool answered"),
    ):
        for runtime, data in raw.items():
            if not isinstance(data, dict) or "cold" not in data:
                continue
            for case in ("warm", "cold"):
                samples = [s for s in data[case] if case == "cold" or s.get("hit")]
                values = sorted(s[key] for s in samples)
                if not values:
                    continue
                ys = [(i + 1) / len(values) for i in range(len(values))]
                ax.step(
                    values,
                    ys,
                    where="post",
                    linestyle=STYLES.get(runtime, ":"),
                    color=COLORS[case],
                    label=f"{runtime}, {case} (n={len(values)})",
                )
                drawn = True
        ax.set_xscale("log")
        ax.set_xlabel("milliseconds (log scale)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("fraction of sessions (CDF)")
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle("Session ready: warm-pool hit vs cold start")
    fig.tight_layout()
    if not drawn:
        plt.close(fig)
        return "no session-ready samples to plot"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return None


def density_png(raw: dict[str, Any], out: Path) -> str | None:
    """Node memory and manager ``/alive`` latency against live sessions; None on success, else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'); no plot"
    curve = raw.get("curve") or []
    if len(curve) < 2:
        return "fewer than two density checkpoints; no plot"
    live = [c["sessions"] for c in curve]
    fig, (mem, lat) = plt.subplots(1, 2, figsize=(11, 4.2))
    mem.plot(live, [c["nodes_uss_total_mib"] / 1024 for c in curve], "o-", label="nodes, total USS")
    mem.plot(live, [c["manager_rss_mib"] / 1024 for c in curve], "s--", label="manager RSS")
    mem.set_xlabel("live idle sessions")
    mem.set_ylabel("GiB")
    mem.set_title("memory")
    mem.legend(fontsize=8)
    lat.plot(live, [c["alive_ms"]["p50"] for c in curve], "o-", label="/alive p50")
    lat.plot(live, [c["alive_ms"]["p99"] for c in curve], "s-", label="/alive p99")
    lat.plot(live, [c["warm_claim_ms"]["p50"] for c in curve], "^--", label="warm claim p50")
    lat.set_xlabel("live idle sessions")
    lat.set_ylabel("milliseconds")
    lat.set_title("manager latency")
    lat.legend(fontsize=8)
    for ax in (mem, lat):
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"Density: {live[-1]} idle sessions on one manager (process runtime)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return None
