"""Paths resolved beneath the workspace without a check-then-use race.

A path is walked one component at a time from a descriptor of the workspace directory: every
directory is opened relative to its parent's descriptor with ``O_NOFOLLOW | O_DIRECTORY``, and the
final entry is opened (or stat'ed, renamed, removed) relative to its directory's descriptor. The
kernel never follows a symlink for us. A symlink met on the way is read (``readlinkat``) and its
target walked the same way, from the directory that holds it; one that leads outside the workspace
is refused, so are more than :data:`MAX_SYMLINKS` of them. An entry swapped for a symlink between
our look at it and its opening fails the ``O_NOFOLLOW`` open (``ELOOP``) and is refused too: what a
tool reads or writes is always beneath the workspace, whatever runs beside it.

Why a walk and not ``openat2(RESOLVE_BENEATH)``: the walk needs nothing but POSIX ``*at`` calls, so
it works on every kernel and under gVisor (whose ``openat2`` is missing), and it resolves symlinks
that stay inside the workspace as the tools always did. The cost is one ``open`` per component.

Regular files with more than one hard link are refused for reading (:meth:`Located.open_file`):
a link to a host file made in the workspace would otherwise expose that file. Tiers whose workspace
is a filesystem of its own (a volume) make such links impossible; the process tier does not.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from toolserver.errors import WorkspacePathError

#: symlinks followed in one path before it is refused (Linux's own limit)
MAX_SYMLINKS = 40
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def path_parts(workspace: Path, raw: str) -> list[str]:
    """The components of ``raw`` relative to the workspace; WorkspacePathError for what never can be."""
    parts = _relative_parts(workspace, checked_text(raw), raw)
    depth = 0
    for part in parts:  # what leaves the workspace as written is refused, whatever exists
        depth += -1 if part == ".." else 1
        if depth < 0:
            raise _outside(raw)
    return parts


def checked_text(raw: str) -> str:
    """``raw`` as a workspace path's text (stripped, ``/``-separated); WorkspacePathError for what no
    workspace path can be (not a string, a NUL byte, an unpaired surrogate, a home directory)."""
    if not isinstance(raw, str):
        raise WorkspacePathError(f"path must be a string, got {type(raw).__name__}")
    if "\x00" in raw:
        raise WorkspacePathError(f"path {raw!r} contains a NUL byte, which no workspace path may hold")
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        raise WorkspacePathError(
            f"path {raw!r} is not valid Unicode (an unpaired surrogate): no file can have that name"
        ) from None
    text = raw.strip().replace("\\", "/")
    if text.startswith("~"):
        raise WorkspacePathError(
            f"path {raw!r} points into a home directory, outside the workspace; "
            "use a path relative to the workspace"
        )
    return text


def _relative_parts(workspace: Path, text: str, raw: str) -> list[str]:
    if not text.startswith("/"):
        return [p for p in text.split("/") if p not in ("", ".")]
    parts = [p for p in PurePosixPath(text).parts[1:] if p not in ("", ".")]
    root = workspace.parts[1:]
    if tuple(parts[: len(root)]) != root:
        raise WorkspacePathError(
            f"path {raw!r} leads outside the workspace; use a path relative to the workspace root"
        )
    return parts[len(root) :]


def _outside(raw: str) -> WorkspacePathError:
    return WorkspacePathError(
        f"path {raw!r} leads outside the workspace; use a path relative to the workspace root"
    )


def open_subdir(dir_fd: int, name: str, raw: str) -> int:
    """``name`` in ``dir_fd`` opened as a directory, never through a symlink."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise WorkspacePathError(
                f"path {raw!r}: {name!r} is a symlink (it was replaced while the path was resolved)"
            ) from None
        raise


@dataclass
class Located:
    """Where a path ends: its directory (an open descriptor, owned) and the final name in it.

    ``name`` is None when the path is a directory reached as a whole (the workspace root, ``a/..``);
    ``rel`` is the workspace-relative POSIX path of the place, ``'.'`` for the root.
    """

    dir_fd: int
    name: str | None
    rel: str
    raw: str
    _closed: bool = field(default=False, repr=False)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.dir_fd)

    def __enter__(self) -> Located:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def lstat(self) -> os.stat_result | None:
        """The final entry's own stat (a symlink is not followed), None when it does not exist."""
        try:
            if self.name is None:
                return os.fstat(self.dir_fd)
            return os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def open_dir(self) -> int:
        """A new descriptor of the final entry as a directory (NotADirectoryError, FileNotFoundError)."""
        if self.name is None:
            return os.dup(self.dir_fd)
        return open_subdir(self.dir_fd, self.name, self.raw)

    def open_file(self, flags: int = os.O_RDONLY, mode: int = 0o666) -> int:
        """The final entry opened as a regular file with ``flags``, never through a symlink.

        IsADirectoryError for anything but a regular file; WorkspacePathError for a file with more
        than one hard link (it may be a host file linked into the workspace).
        """
        if self.name is None:
            raise IsADirectoryError(f"{self.raw!r} is a directory")
        return open_file_at(self.dir_fd, self.name, self.raw, flags, mode)


def open_file_at(dir_fd: int, name: str, raw: str, flags: int = os.O_RDONLY, mode: int = 0o666) -> int:
    """``name`` in ``dir_fd`` opened as a regular file with ``flags``, never through a symlink.

    IsADirectoryError for anything but a regular file (a fifo is opened without blocking, then
    refused); WorkspacePathError for a symlink or a file with more than one hard link.
    """
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise WorkspacePathError(
                f"path {raw!r} is a symlink (it was replaced while the path was resolved)"
            ) from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise IsADirectoryError(f"{raw!r} is not a regular file")
        check_links(info, raw)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_links(info: os.stat_result, raw: str) -> None:
    """Refuse a regular file with more than one hard link: another name of it may be outside."""
    if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
        raise WorkspacePathError(
            f"{raw!r} has {info.st_nlink} hard links: it may be a file from outside the workspace "
            "linked into it, so it is not served; copy it (cp) to use its content"
        )


def locate(workspace: Path, raw: str, *, follow_final: bool = True, create_dirs: bool = False) -> Located:
    """Walk ``raw`` beneath ``workspace``; the caller closes the answer (a context manager).

    ``follow_final``: a final symlink is resolved (beneath the workspace) rather than named itself;
    ``create_dirs``: missing directories on the way are created. Raises WorkspacePathError for a
    path that leaves the workspace, FileNotFoundError / NotADirectoryError for a missing or
    non-directory component on the way.
    """
    pending = path_parts(workspace, raw)
    stack = [os.open(workspace, _DIR_FLAGS)]
    names: list[str] = []
    links = 0
    final: str | None = None
    try:
        while pending:
            part = pending.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if len(stack) == 1:
                    raise _outside(raw)
                os.close(stack.pop())
                names.pop()
                continue
            last = not pending
            if last and not follow_final:
                final = part
                break
            try:
                info = os.stat(part, dir_fd=stack[-1], follow_symlinks=False)
            except FileNotFoundError:
                if last:
                    final = part
                    break
                if not create_dirs:
                    raise FileNotFoundError(errno.ENOENT, f"{raw!r} not found in the workspace") from None
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o777, dir_fd=stack[-1])
                info = os.stat(part, dir_fd=stack[-1], follow_symlinks=False)
            if stat.S_ISLNK(info.st_mode):
                links += 1
                if links > MAX_SYMLINKS:
                    raise WorkspacePathError(f"path {raw!r} goes through more than {MAX_SYMLINKS} symlinks")
                target = os.readlink(part, dir_fd=stack[-1]).replace("\\", "/")
                if target.startswith("/"):
                    try:
                        target_parts = _relative_parts(workspace, target, raw)
                    except WorkspacePathError:
                        raise _outside(raw) from None
                    for fd in stack[1:]:
                        os.close(fd)
                    del stack[1:], names[:]
                else:
                    target_parts = [p for p in target.split("/") if p not in ("", ".")]
                pending[:0] = target_parts
                continue
            if last:
                final = part
                break
            if not stat.S_ISDIR(info.st_mode):
                raise NotADirectoryError(
                    errno.ENOTDIR, f"{raw!r}: {'/'.join([*names, part])!r} is not a directory"
                )
            stack.append(open_subdir(stack[-1], part, raw))
            names.append(part)
    except BaseException:
        for fd in stack:
            os.close(fd)
        raise
    for fd in stack[:-1]:
        os.close(fd)
    rel = "/".join([*names, final] if final is not None else names) or "."
    return Located(stack[-1], final, rel, raw)


@contextlib.contextmanager
def opened_dir(workspace: Path, raw: str) -> Iterator[tuple[int, str]]:
    """A descriptor of the directory ``raw`` names (closed afterwards), and its relative path."""
    with locate(workspace, raw) as where:
        fd = where.open_dir()
        try:
            yield fd, where.rel
        finally:
            os.close(fd)


def scan(dir_fd: int) -> list[os.DirEntry[str]]:
    """The entries of an open directory; their ``stat()`` needs ``dir_fd`` still open."""
    with os.scandir(dir_fd) as it:
        return list(it)
