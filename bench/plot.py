"""The session-ready latency distribution (warm vs cold) as a PNG, with matplotlib if installed."""

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
