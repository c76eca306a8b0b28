"""FileSystemEnv: look at, read and write the files of the workspace (names as XAgent spells them)."""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import stat
from collections.abc import Iterator
from typing import BinaryIO

from toolserver.errors import ToolArgumentError, ToolError
from toolserver.node.beneath import Located, open_subdir, scan
from toolserver.node.registry import Env, tool

_MAX_TREE_LINES = 2000
_MAX_DEPTH = 20


def _is_binary(handle: BinaryIO) -> bool:
    handle.seek(0)
    binary = b"\x00" in handle.read(8192)
    handle.seek(0)
    return binary


def _open_existing(where: Located, filepath: str) -> BinaryIO | None:
    """The file ``where`` names, opened for reading; None when there is none; ToolError when not a file."""
    try:
        return os.fdopen(where.open_file(), "rb")
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise ToolError(f"{filepath!r} exists and is not a file") from None


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

        def walk(dir_fd: int, depth: int) -> None:
            if len(lines) >= _MAX_TREE_LINES:
                return
            indent = "    " * (depth + 1)
            if depth >= _MAX_DEPTH:
                lines.append(f"{indent}- ... (deeper levels not shown)")
                return
            try:
                entries = [e for e in scan(dir_fd) if not ctx.is_ignored(e.name)]
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
                    lines.append(f"{indent}- {entry.name} -> {os.readlink(entry.name, dir_fd=dir_fd)}")
                elif entry.is_dir(follow_symlinks=False):
                    lines.append(f"{indent}- {entry.name}/")
                    try:
                        sub = open_subdir(dir_fd, entry.name, entry.name)
                    except (OSError, ToolError):
                        continue  # gone or swapped for a symlink meanwhile
                    try:
                        walk(sub, depth + 1)
                    finally:
                        os.close(sub)
                else:
                    lines.append(f"{indent}- {entry.name}")

        with ctx.locate(".") as root:
            walk(root.dir_fd, 0)
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
        try:
            with self.ctx.locate(filepath) as where:
                handle = os.fdopen(where.open_file(), "rb")
        except (FileNotFoundError, NotADirectoryError):
            raise ToolError(f"file {filepath!r} not found in the workspace") from None
        except IsADirectoryError:
            raise ToolError(f"{filepath!r} is not a file") from None
        with handle:
            if _is_binary(handle):
                raise ToolError(f"{filepath!r} is a binary file; download it instead of reading it as text")
            return self._numbered(handle, line_number)

    def _numbered(self, handle: BinaryIO, line_number: int) -> str:
        limit = self.ctx.config.max_output_chars
        start = line_number
        handle.seek(0)
        if line_number < 0:
            total = sum(1 for _ in handle)
            handle.seek(0)
            start = max(1, total + line_number + 1)
        elif line_number == 0:
            start = 1
        out: list[str] = []
        size = 0
        total = 0
        with io.TextIOWrapper(handle, encoding="utf-8", errors="replace", newline="") as fh:
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
        try:
            where = self.ctx.locate(filepath, create_dirs=True)
        except NotADirectoryError:
            raise ToolError(f"a folder on the way to {filepath!r} exists and is not a folder") from None
        with where:
            if where.name is None:
                raise ToolError(f"{filepath!r} exists and is not a file")
            lines: list[str] = []
            info = where.lstat()
            if info is not None and not stat.S_ISREG(info.st_mode):
                raise ToolError(f"{filepath!r} exists and is not a file")
            mode = None if info is None else stat.S_IMODE(info.st_mode)
            old = None if truncating or info is None else _open_existing(where, filepath)
            if old is not None:  # read through the descriptor: never a file that replaced it meanwhile
                with old:
                    mode = stat.S_IMODE(os.fstat(old.fileno()).st_mode)
                    if _is_binary(old):
                        raise ToolError(f"{filepath!r} is a binary file; set truncating=true to replace it")
                    lines = old.read().decode("utf-8", errors="replace").splitlines(keepends=True)
            text = self._edit(lines, content, line_number, overwrite, end_line)
            with _replace(where, mode) as written:
                written.write(text.encode("utf-8"))
                written.flush()
                return self._numbered(written, 1)

    @staticmethod
    def _edit(
        lines: list[str], content: str, line_number: int | None, overwrite: bool, end_line: int | None
    ) -> str:
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
        return "".join(lines)


@contextlib.contextmanager
def _replace(where: Located, mode: int | None) -> Iterator[BinaryIO]:
    """A new file beside ``where``'s, renamed over it once written: a hard link is never written through."""
    assert where.name is not None
    tmp = f".{where.name[:200]}.{secrets.token_hex(4)}.tmp"
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    handle = os.fdopen(os.open(tmp, flags, 0o644 if mode is None else mode, dir_fd=where.dir_fd), "w+b")
    try:
        with handle:
            if mode is not None:
                os.fchmod(handle.fileno(), mode)
            yield handle
            os.replace(tmp, where.name, src_dir_fd=where.dir_fd, dst_dir_fd=where.dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=where.dir_fd)
        raise
