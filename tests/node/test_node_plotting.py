"""The notebook's data stack: numpy, pandas and matplotlib import in the kernel and a plot comes back
as a PNG, while the node's own process never imports any of them."""

from __future__ import annotations

import base64
import sys
from pathlib import Path

from .conftest import Node

STACK = ("numpy", "pandas", "matplotlib")

PLOT = """
import numpy as np, pandas as pd, matplotlib, matplotlib.pyplot as plt
frame = pd.DataFrame({"x": np.arange(10), "y": np.arange(10) ** 2})
print(matplotlib.get_backend(), int(frame.y.sum()))
frame.plot(x="x", y="y")
"""


def mapped_stack(pid: int) -> set[str]:
    """Which of the stack's packages have files mapped into process ``pid``."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {name for name in STACK if f"/{name}/" in maps}


def test_a_plot_comes_back_as_a_png_and_the_node_stays_lean(make_node) -> None:  # type: ignore[no-untyped-def]
    node: Node = make_node(config={"notebook_timeout": 120})
    assert node.proc is not None
    assert mapped_stack(node.proc.pid) == set()
    response = node.run("PythonNotebook_execute_cell", code=PLOT)
    assert response.status_code == 200, response.text
    parts = response.json()["data"]
    assert "module://matplotlib_inline.backend_inline 285" in parts[1]
    image = next(p for p in parts if isinstance(p, dict) and p.get("type") == "binary")
    assert image["media_type"] == "image/png"
    assert base64.b64decode(image["data"]).startswith(b"\x89PNG\r\n\x1a\n")
    assert mapped_stack(node.proc.pid) == set()
    # a script run by the shell renders without a display (Agg)
    script = (
        "import matplotlib.pyplot as plt; plt.plot([1, 2]); plt.savefig('p.png'); print(plt.get_backend())"
    )
    out = node.ok("shell_command_executor", command=f'{sys.executable} -c "{script}"')
    assert out["returncode"] == 0 and out["output"].strip().lower() == "agg", out
    assert (node.workspace / "p.png").read_bytes().startswith(b"\x89PNG")
