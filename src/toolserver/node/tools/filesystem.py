"""FileSystemEnv: look at, read and write the files of the workspace (names as XAgent spells them)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from toolserver.errors import ToolArgumentError, ToolError
from toolserver.node.registry import Env, tool

_MAX_TREE_LINES = 2000
_MAX_DEPTH = 20


def _is_binary(path: Path) -> bool:
    with path.open("rb") as fh:
        return b"\x00" in fh.read(8192)


class FileSystemEnv(Env):
    """Files and folders of the workspace: print its structure, read a file with line numbers, write or
    edit a file. Paths are relative to the workspace root."""

    @tool
    def print_filesys_struture(self, return_root: bool = False) -> str:
        """Show every file and folder of the workspace as an indented tree.

        Use it when you are not sure what the workspace holds. Long folders are cut after a fixed
        number of entries; ignored names (.git, __pycache__, ...) are left out.

        Args:
            return_root: Also print the absolute path of the workspace root.
        """
        ctx = self.ctx
        cap = ctx.config.max_entries_per_level
        lines: list[str] = []
        if return_root:
            lines.append(f"Global Root Work Directory: {ctx.workspace}")
        lines.append("- ./")

        def walk(directory: Path, depth: int) -> None:
            if len(lines) >= _MAX_TREE_LINES:
                return
            indent = "    " * (depth + 1)
            if depth >= _MAX_DEPTH:
                lines.append(f"{indent}- ... (deeper levels not shown)")
                return
            try:
                entries = [e for e in os.scandir(directory) if not ctx.is_ignored(e.name)]
            except OSError as exc:
                lines.append(f"{indent}- (cannot list: {exc.strerror})")
                return
            entries.sort(key=lambda e: (not e.is_dir(follow_symlinks=False), e.name))
            for shown, entry in enumerate(entries):
                if shown >= cap:
                    lines.append(f"{indent}- ... {len(entries) - cap} more entries")
                    break
                if len(lines) >= _MAX_TREE_LINES:
                    lines.append(f"{indent}- ... (listing cut at {_MAX_TREE_LINES} lines)")
                    return
                if entry.is_symlink():
                    lines.append(f"{indent}- {entry.name} -> {os.readlink(entry.path)}")
                elif entry.is_dir():
                    lines.append(f"{indent}- {entry.name}/")
                    walk(Path(entry.path), depth + 1)
                else:
                    lines.append(f"{indent}- {entry.name}")

        walk(ctx.workspace, 0)
        return "\n".join(lines) + "\n"

    @tool
    def read_from_file(self, filepath: str, line_number: int = 1) -> str:
        """Read a text file of the workspace; every line comes back prefixed with its number.

        Long files are cut; the answer then says which line to continue from.

        Args:
            filepath: Path of the file, relative to the workspace root.
            line_number: First line to show (1-based). A negative number counts from the end: -10 shows
                the last 10 lines.
        """
        path = self.ctx.resolve(filepath)
        if not path.exists():
            raise ToolError(f"file {filepath!r} not found in the workspace")
        if not path.is_file():
            raise ToolError(f"{filepath!r} is not a file")
        if _is_binary(path):
            raise ToolError(f"{filepath!r} is a binary file; download it instead of reading it as text")
        return self._numbered(path, line_number)

    def _numbered(self, path: Path, line_number: int) -> str:
        limit = self.ctx.config.max_output_chars
        start = line_number
        if line_number < 0:
            with path.open("rb") as fh:
                total = sum(1 for _ in fh)
            start = max(1, total + line_number + 1)
        elif line_number == 0:
            start = 1
        out: list[str] = []
        size = 0
        total = 0
        with path.open("r", encoding="utf-8", errors="replace", newline="") as fh:
            for total, line in enumerate(fh, start=1):
                if total < start:
                    continue
                text = f"{total:>5}: {line.rstrip(chr(10)).rstrip(chr(13))}\n"
                if size + len(text) > limit and out:
                    out.append(f"[output cut: call again with line_number={total} to read on]\n")
                    return "".join(out)
                out.append(text)
                size += len(text)
        if total == 0:
            return "(the file is empty)\n"
        if start > total:
            raise ToolArgumentError(f"line_number {line_number} is past the end of the file ({total} lines)")
        return "".join(out)

    @tool
    def write_to_file(
        self,
        filepath: str,
        content: str,
        truncating: bool = False,
        line_number: int | None = None,
        overwrite: bool = False,
        end_line: int | None = None,
    ) -> str:
        """Create a text file, or change the lines of one; returns the file's new content with line numbers.

        Without line_number the content is appended at the end (a new file is created, with its folders).
        With line_number the content is inserted before that line; with overwrite=true it replaces as many
        lines as it has, from that line on; with end_line it replaces the lines line_number..end_line.

        Example: write_to_file('notes.txt', 'a\\nb', truncating=True) makes a file of two lines;
        write_to_file('notes.txt', 'B', line_number=2, overwrite=True) then turns line 2 into 'B'.

        Args:
            filepath: Path of the file, relative to the workspace root.
            content: The text to write.
            truncating: Empty the file first (replace all of it by content).
            line_number: 1-based line where the content goes; default: the end of the file.
            overwrite: Replace existing lines from line_number on instead of inserting before it.
            end_line: Last line (inclusive) of the range line_number..end_line to replace with content.
        """
        path = self.ctx.resolve(filepath)
        if path.exists() and not path.is_file():
            raise ToolError(f"{filepath!r} exists and is not a file")
        if path.exists() and _is_binary(path) and not truncating:
            raise ToolError(f"{filepath!r} is a binary file; set truncating=true to replace it")
        lines: list[str] = []
        if path.exists() and not truncating:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        new = content.splitlines(keepends=True)
        if line_number is None:
            if end_line is not None:
                raise ToolArgumentError("end_line needs line_number (the first line of the range)")
            if lines and not lines[-1].endswith("\n"):
                lines[-1] += "\n"
            lines.extend(new)
        else:
            index = line_number - 1 if line_number > 0 else len(lines) + line_number + 1
            if line_number == 0:
                index = 0
            if not 0 <= index <= len(lines):
                raise ToolArgumentError(
                    f"line_number {line_number} is out of range: the file has {len(lines)} lines"
                )
            if end_line is not None:
                if end_line < line_number or end_line > len(lines):
                    raise ToolArgumentError(
                        f"end_line {end_line} must be between line_number ({line_number}) and {len(lines)}"
                    )
                stop = end_line
            elif overwrite:
                stop = index + len(new)
            else:
                stop = index
            lines[index:stop] = new
        lines = [line if line.endswith("\n") else line + "\n" for line in lines]
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, "".join(lines))
        return self._numbered(path, 1)


def _atomic_write(path: Path, text: str) -> None:
    mode = path.stat().st_mode & 0o7777 if path.exists() else None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
