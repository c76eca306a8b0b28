"""PythonNotebook: Python cells run on a real Jupyter kernel that keeps its state between cells.

The kernel (ipykernel, through jupyter_client) starts on first use with the workspace as its working
directory. The notebook is saved in the workspace as an ``.ipynb`` file after every cell. Images a
cell displays come back as binary results. A cell that runs too long is interrupted (state kept).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import re
import time
import uuid
from pathlib import Path
from queue import Empty
from typing import Any

from toolserver.errors import ToolArgumentError, ToolError, ToolTimeout
from toolserver.node.registry import Env, tool
from toolserver.node.results import Binary, Composite

log = logging.getLogger("toolserver.node")

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
#: ipykernel's own matplotlib backend: a figure at the end of a cell is shown as a PNG
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"
_IMAGE_EXT = {"image/png": "png", "image/jpeg": "jpg", "image/gif": "gif", "image/svg+xml": "svg"}


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half} characters omitted ...]\n{text[-half:]}"


class _Kernel:
    """One ipykernel process and its client."""

    def __init__(self, env: PythonNotebook) -> None:
        self.env = env
        self.km: Any = None
        self.kc: Any = None

    async def alive(self) -> bool:
        return self.km is not None and await self.km.is_alive()

    async def start(self) -> None:
        from jupyter_client.manager import AsyncKernelManager

        ctx = self.env.ctx
        state = ctx.state_dir
        runtime = state / "jupyter"
        runtime.mkdir(parents=True, exist_ok=True)
        env = dict(ctx.child_env)
        env.setdefault("IPYTHONDIR", str(state / "ipython"))
        env.setdefault("JUPYTER_RUNTIME_DIR", str(runtime))
        env.setdefault("MPLCONFIGDIR", str(state / "matplotlib"))
        # figures come back as PNG display data: matplotlib-inline, which renders with Agg
        env["MPLBACKEND"] = INLINE_BACKEND
        env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
        km = AsyncKernelManager(
            kernel_name=ctx.config.kernel_name,
            connection_file=str(runtime / f"kernel-{uuid.uuid4().hex[:12]}.json"),
        )
        await km.start_kernel(cwd=str(ctx.workspace), env=env)
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=ctx.config.kernel_start_timeout)
        except RuntimeError as exc:
            kc.stop_channels()
            await km.shutdown_kernel(now=True)
            raise ToolError(f"the Python kernel did not start: {exc}") from exc
        self.km, self.kc = km, kc

    async def stop(self) -> None:
        km, kc = self.km, self.kc
        self.km = self.kc = None
        if kc is not None:
            with contextlib.suppress(Exception):
                kc.stop_channels()
        if km is not None:
            try:
                await asyncio.wait_for(km.shutdown_kernel(now=True), 5)
            except Exception:
                log.warning("kernel shutdown failed", exc_info=True)
                with contextlib.suppress(Exception):
                    await km._async_kill_kernel()
            with contextlib.suppress(Exception):
                os.unlink(km.connection_file)

    async def execute(self, code: str, seconds: float) -> tuple[list[dict[str, Any]], int | None, str]:
        """Run ``code``; return (nbformat outputs, execution count, 'ok' | 'error' | 'timeout' | 'died')."""
        kc = self.kc
        msg_id = kc.execute(code, store_history=True, allow_stdin=False)
        outputs: list[dict[str, Any]] = []
        count: int | None = None
        deadline = time.monotonic() + seconds
        status = "ok"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                status = "timeout"
                break
            try:
                msg = await kc.get_iopub_msg(timeout=min(remaining, 1.0))
            except Empty:
                if not await self.km.is_alive():
                    return outputs, count, "died"
                continue
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "status" and content.get("execution_state") == "idle":
                break
            if kind == "execute_input":
                count = content.get("execution_count")
            elif kind == "stream":
                if (
                    outputs
                    and outputs[-1]["output_type"] == "stream"
                    and outputs[-1]["name"] == content["name"]
                ):
                    outputs[-1]["text"] += content["text"]
                else:
                    outputs.append(
                        {"output_type": "stream", "name": content["name"], "text": content["text"]}
                    )
            elif kind in ("display_data", "execute_result"):
                out = {
                    "output_type": kind,
                    "data": content.get("data", {}),
                    "metadata": content.get("metadata", {}),
                }
                if kind == "execute_result":
                    out["execution_count"] = content.get("execution_count")
                outputs.append(out)
            elif kind == "error":
                status = "error"
                outputs.append(
                    {
                        "output_type": "error",
                        "ename": content.get("ename", ""),
                        "evalue": content.get("evalue", ""),
                        "traceback": content.get("traceback", []),
                    }
                )
            elif kind == "clear_output":
                outputs.clear()
        if status != "timeout":
            await self._drain_reply(msg_id)
        return outputs, count, status

    async def _drain_reply(self, msg_id: str) -> None:
        """Read the execute_reply off the shell channel so replies do not pile up."""
        end = time.monotonic() + 2
        while time.monotonic() < end:
            try:
                reply = await self.kc.get_shell_msg(timeout=max(0.05, end - time.monotonic()))
            except Empty:
                return
            if reply.get("parent_header", {}).get("msg_id") == msg_id:
                return

    async def interrupt(self) -> bool:
        """Interrupt the running cell; True when the kernel went idle again."""
        await self.km.interrupt_kernel()
        end = time.monotonic() + 5
        while time.monotonic() < end:
            try:
                msg = await self.kc.get_iopub_msg(timeout=max(0.05, end - time.monotonic()))
            except Empty:
                break
            if msg["msg_type"] == "status" and msg["content"].get("execution_state") == "idle":
                return True
        return False


class PythonNotebook(Env):
    """A Python notebook on a live Jupyter kernel: variables, imports and functions persist between cells.
    The notebook is saved in the workspace."""

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.kernel = _Kernel(self)
        self.cells: list[dict[str, Any]] = []
        self._lock = asyncio.Lock()
        self._loaded = False

    async def aclose(self) -> None:
        """Kill the kernel and everything it started (its whole process group)."""
        await self.kernel.stop()

    # -- notebook file ----------------------------------------------------------------------

    def _path(self) -> Path:
        return self.ctx.resolve(self.ctx.config.notebook_file)

    def _load(self) -> None:
        """Pick up the cells of a notebook saved by an earlier run of the node (outputs kept, state not)."""
        self._loaded = True
        try:
            data = json.loads(self._path().read_text(encoding="utf-8"))
            cells = data.get("cells", [])
            if isinstance(cells, list) and all(isinstance(c, dict) for c in cells):
                self.cells = cells
        except (OSError, ValueError, ToolError):
            pass

    def _save(self) -> None:
        notebook = {
            "cells": self.cells,
            "metadata": {
                "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                "language_info": {"name": "python"},
            },
            "nbformat": 4,
            "nbformat_minor": 5,
        }
        path = self._path()
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(json.dumps(notebook, indent=1, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)

    # -- tools ------------------------------------------------------------------------------

    @tool
    async def execute_cell(self, code: str, cell_index: int | None = None, reset: bool = False) -> Any:
        """Put Python code in a notebook cell, run it, and return its output (text, and images as files).

        Cells share one live Python process: variables, imports and functions defined earlier stay available.
        Use it to try ideas quickly and check the output. A cell that runs too long is interrupted (state is
        kept). An exception in the cell makes the call fail with the traceback.

        Args:
            code: The Python code to run.
            cell_index: Index of an existing cell to replace with this code (negative counts from the
                end); default: a new cell at the end.
            reset: Restart the Python process and start an empty notebook before running the code.
        """
        async with self._lock:
            if not self._loaded:
                await asyncio.to_thread(self._load)
            if reset:
                await self.kernel.stop()
                self.cells = []
            if cell_index is None or cell_index == len(self.cells):
                index = len(self.cells)
            elif -len(self.cells) <= cell_index < len(self.cells):
                index = cell_index % len(self.cells)
            else:
                raise ToolArgumentError(
                    f"argument 'cell_index': {cell_index} is out of range, "
                    f"the notebook has {len(self.cells)} cells"
                )
            if not await self.kernel.alive():
                await self.kernel.stop()
                await self.kernel.start()
            cell = {
                "cell_type": "code",
                "id": uuid.uuid4().hex[:8],
                "metadata": {},
                "source": code,
                "execution_count": None,
                "outputs": [],
            }
            if index == len(self.cells):
                self.cells.append(cell)
            else:
                self.cells[index] = cell
            timeout = self.ctx.config.notebook_timeout
            try:
                outputs, count, status = await self.kernel.execute(code, timeout)
            except asyncio.CancelledError:  # the caller went away: stop the cell, keep the variables
                import anyio

                with anyio.CancelScope(shield=True):
                    if not await self.kernel.interrupt():
                        await self.kernel.stop()
                raise
            note = None
            if status == "timeout":
                idle = await self.kernel.interrupt()
                note = f"the cell ran longer than {timeout:g} s and was interrupted"
                if not idle:
                    await self.kernel.stop()
                    note += "; the kernel did not respond and was restarted (variables are lost)"
                else:
                    note += " (variables defined so far are kept)"
            elif status == "died":
                await self.kernel.stop()
                note = (
                    "the Python process died while running the cell; "
                    "it will restart on the next cell (variables are lost)"
                )
            cell["outputs"], cell["execution_count"] = outputs, count
            await asyncio.to_thread(self._save)

        limit = self.ctx.config.max_output_chars
        if status == "timeout":
            raise ToolTimeout(
                f"cell_index: {index}: {note}",
                partial={"cell_index": index, "output": _clip(self._outputs_text(outputs), limit)},
            )
        if status == "died":
            raise ToolError(
                f"cell_index: {index}: {note}\n{_clip(self._outputs_text(outputs), limit)}".rstrip()
            )
        if status == "error":
            raise ToolError(f"cell_index: {index}\n{_clip(self._outputs_text(outputs), limit)}")
        return self._result(index, outputs)

    @tool
    async def print_notebook(self) -> str:
        """Show every cell of the notebook with its code and its text output."""
        async with self._lock:
            if not self._loaded:
                await asyncio.to_thread(self._load)
            parts = []
            for i, cell in enumerate(self.cells):
                parts.append(f"= Cell {i} =\n{_source(cell)}")
                outputs = cell.get("outputs") or []
                if outputs:
                    parts.append(f"= Output {i} =\n{self._outputs_text(outputs)}")
        if not parts:
            return "The notebook is empty."
        return _clip("\n".join(parts), self.ctx.config.max_output_chars)

    # -- formatting -------------------------------------------------------------------------

    def _result(self, index: int, outputs: list[dict[str, Any]]) -> Any:
        items: list[Any] = [f"cell_index: {index}"]
        limit = self.ctx.config.max_output_chars
        for n, out in enumerate(outputs):
            data = out.get("data", {})
            image = next((m for m in data if m in _IMAGE_EXT and m != "image/svg+xml"), None)
            if out["output_type"] in ("display_data", "execute_result") and image:
                raw = data[image]
                payload = base64.b64decode("".join(raw) if isinstance(raw, list) else raw)
                items.append(Binary(payload, image, f"cell{index}_{n}.{_IMAGE_EXT[image]}"))
                continue
            text = _output_text(out)
            if isinstance(items[-1], str) and len(items) > 1:
                items[-1] += text
            else:
                items.append(text)
        items = [_clip(i, limit) if isinstance(i, str) else i for i in items]
        if len(items) == 1:
            return items[0]
        return Composite(items)

    def _outputs_text(self, outputs: list[dict[str, Any]]) -> str:
        return "".join(_output_text(out) for out in outputs)


def _source(cell: dict[str, Any]) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else str(source)


def _output_text(out: dict[str, Any]) -> str:
    kind = out.get("output_type")
    if kind == "stream":
        text = out.get("text", "")
        return "".join(text) if isinstance(text, list) else text
    if kind == "error":
        return (
            _ANSI.sub("", "\n".join(out.get("traceback") or [f"{out.get('ename')}: {out.get('evalue')}"]))
            + "\n"
        )
    data = out.get("data", {})
    for media in ("text/plain", "text/markdown", "application/json", "text/html"):
        if media in data:
            value = data[media]
            if not isinstance(value, str):
                value = "".join(value) if isinstance(value, list) else json.dumps(value)
            return value + "\n"
    kinds = ", ".join(data) or "no data"
    return f"[{kinds}]\n"
