"""Moving files in and out of the workspace: streamed multipart upload, zip of the workspace, tree listing.

Uploads are parsed chunk by chunk (python-multipart) and written to a temporary file inside the
workspace, then renamed into place; nothing is held in memory and the size limit is enforced while
reading. The workspace zip is built in a worker thread into the node's state dir (outside the
workspace) and streamed from there.
"""

from __future__ import annotations

import contextlib
import errno
import mimetypes
import os
import shutil
import stat
import time
import uuid
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import StreamingResponse

from toolserver.errors import WorkspacePathError
from toolserver.node.beneath import Located, open_file_at, open_subdir, opened_dir, scan
from toolserver.node.context import NodeContext

UPLOAD_PREFIX = ".toolserver-upload-"
DOWNLOAD_CHUNK = 256 * 1024
_FIELD_MAX = 4096
_MULTIPART_SLACK = 1 << 20  # headers and boundaries around the file's bytes
_FORBIDDEN_CHARS = set('<>:"|?*')
_MAX_ZIP_DEPTH = 64


def sanitize_filename(raw: str) -> str:
    """A safe base name for an uploaded file: no directories, control characters or reserved names."""
    name = raw.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable() and ch not in _FORBIDDEN_CHARS).strip()
    if name in ("", ".", "..") or name.startswith(UPLOAD_PREFIX):
        raise HTTPException(400, f"invalid file name {raw!r}")
    encoded = name.encode()
    if len(encoded) > 255:
        stem, dot, ext = name.rpartition(".")
        ext = f".{ext}" if dot and len(ext) < 16 else ""
        name = (stem if dot else name).encode()[: 255 - len(ext.encode())].decode(errors="ignore") + ext
    return name


class _Part:
    def __init__(self) -> None:
        self.header_field = b""
        self.header_value = b""
        self.headers: dict[bytes, bytes] = {}
        self.name = ""
        self.filename: str | None = None
        self.value = bytearray()


async def receive_upload(request: Request, ctx: NodeContext) -> dict[str, Any]:
    """Stream a multipart upload (parts: ``file``; optional ``filename`` and ``path``) into the workspace."""
    import anyio.to_thread
    from python_multipart.multipart import MultipartParser, parse_options_header

    mime, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if mime != b"multipart/form-data" or not boundary:
        raise HTTPException(400, "upload_file expects a multipart/form-data body with a 'file' part")
    limit = ctx.config.upload_max_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + _MULTIPART_SLACK:
        raise HTTPException(413, f"the upload is larger than the limit of {limit} bytes")

    fields: dict[str, str] = {}
    state: dict[str, Any] = {"part": None, "file_part": None, "pending": []}

    def on_part_begin() -> None:
        state["part"] = _Part()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["part"].header_field += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["part"].header_value += data[start:end]

    def on_header_end() -> None:
        part = state["part"]
        part.headers[part.header_field.lower()] = part.header_value
        part.header_field = part.header_value = b""

    def on_headers_finished() -> None:
        part = state["part"]
        _, disp = parse_options_header(part.headers.get(b"content-disposition", b""))
        part.name = disp.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in disp:
            part.filename = disp[b"filename"].decode("utf-8", "replace")
        if part.name == "file":
            if state["file_part"] is not None:
                raise HTTPException(400, "only one 'file' part per upload")
            state["file_part"] = part

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part = state["part"]
        if part is state["file_part"]:
            state["pending"].append(data[start:end])
        elif part.name in ("filename", "path"):
            part.value += data[start:end]
            if len(part.value) > _FIELD_MAX:
                raise HTTPException(400, f"the '{part.name}' part is too long")

    def on_part_end() -> None:
        part = state["part"]
        if part is not None and part.name in ("filename", "path"):
            fields[part.name] = part.value.decode("utf-8", "replace").strip()

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    tmp = f"{UPLOAD_PREFIX}{uuid.uuid4().hex}.part"
    root = ctx.locate(".")
    handle: BinaryIO | None = None
    size = received = 0

    def open_tmp() -> BinaryIO:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.fdopen(os.open(tmp, flags, 0o644, dir_fd=root.dir_fd), "wb")

    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit + _MULTIPART_SLACK:
                raise HTTPException(413, f"the upload is larger than the limit of {limit} bytes")
            try:
                parser.write(chunk)
            except HTTPException:
                raise
            except Exception as exc:
                raise HTTPException(400, f"malformed multipart body: {exc}") from None
            if state["pending"]:
                data = b"".join(state["pending"])
                state["pending"].clear()
                size += len(data)
                if size > limit:
                    raise HTTPException(413, f"the upload is larger than the limit of {limit} bytes")
                if handle is None:
                    handle = await anyio.to_thread.run_sync(open_tmp)
                await _written(handle.write, data, size)
        try:
            parser.finalize()
        except Exception as exc:
            raise HTTPException(400, f"malformed multipart body: {exc}") from None
        file_part = state["file_part"]
        if file_part is None:
            raise HTTPException(400, "the upload has no 'file' part")
        if handle is None:
            handle = await anyio.to_thread.run_sync(open_tmp)
        await _written(handle.close, None, size)
        name = sanitize_filename(fields.get("filename") or file_part.filename or "")
        rel = await anyio.to_thread.run_sync(
            _move_into_place, ctx, root.dir_fd, tmp, fields.get("path"), name
        )
    finally:
        if handle is not None and not handle.closed:
            # what is still buffered cannot be written on a full disk: the answer stays the 507
            with contextlib.suppress(OSError):
                handle.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=root.dir_fd)
        root.close()
    return {"message": "Upload Success!", "file_path": rel, "size": size}


async def _written(write: Any, data: bytes | None, size: int) -> None:
    """``write(data)`` (or ``write()``) in a thread; a full workspace is the client's 507."""
    import anyio.to_thread

    try:
        await anyio.to_thread.run_sync(write, *(() if data is None else (data,)))
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise HTTPException(
            507, f"the workspace is full (no space left after {size} bytes of the upload): nothing was kept"
        ) from None


def _upload_target(ctx: NodeContext, path: str | None, name: str) -> Located:
    """Where an upload goes: ``path``, or ``name`` in the directory ``path`` names (made if missing)."""
    with ctx.locate(path or ".", create_dirs=True) as where:
        info = where.lstat()
        into_dir = not path or path.rstrip().endswith(("/", "\\"))
        if not into_dir and where.name is not None and (info is None or not stat.S_ISDIR(info.st_mode)):
            return Located(os.dup(where.dir_fd), where.name, where.rel, path or name)
        if where.name is not None and info is None:
            os.mkdir(where.name, 0o777, dir_fd=where.dir_fd)
        dir_fd = where.open_dir()
        rel = name if where.rel == "." else f"{where.rel}/{name}"
    return Located(dir_fd, name, rel, path or name)


def _move_into_place(ctx: NodeContext, root_fd: int, tmp: str, path: str | None, name: str) -> str:
    try:
        target = _upload_target(ctx, path, name)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise HTTPException(400, f"upload target {path!r}: {exc.strerror or exc}") from None
    with target:
        info = target.lstat()
        if info is not None and stat.S_ISDIR(info.st_mode):
            raise HTTPException(400, f"upload target {target.rel!r} is a directory")
        assert target.name is not None
        os.replace(tmp, target.name, src_dir_fd=root_fd, dst_dir_fd=target.dir_fd)
        return target.rel


def build_workspace_zip(ctx: NodeContext) -> Path:
    """Zip the workspace into a temp file in the state dir, walked by descriptors (see ``beneath``).

    Symlinks are stored as the file they point to when that is a regular file beneath the workspace,
    and left out otherwise; so are files with several hard links, sockets and fifos.
    """
    fd, name = _mkstemp(ctx.tmp_dir)
    path = Path(name)
    try:
        with (
            os.fdopen(fd, "wb") as raw,
            zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf,
            ctx.locate(".") as root,
        ):
            _zip_dir(ctx, zf, root.dir_fd, "", 0)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _zip_dir(ctx: NodeContext, zf: zipfile.ZipFile, dir_fd: int, prefix: str, depth: int) -> None:
    entries = sorted(scan(dir_fd), key=lambda e: e.name)
    if prefix and not entries:
        info = zipfile.ZipInfo(prefix)
        info.external_attr = (0o40755 << 16) | 0x10
        zf.writestr(info, b"")
    for entry in entries:
        rel = prefix + entry.name
        if entry.name.startswith(UPLOAD_PREFIX):
            continue
        try:
            if entry.is_symlink():
                with ctx.locate(rel) as where:
                    src = where.open_file()
            elif entry.is_dir(follow_symlinks=False):
                if depth < _MAX_ZIP_DEPTH:
                    sub = open_subdir(dir_fd, entry.name, rel)
                    try:
                        _zip_dir(ctx, zf, sub, rel + "/", depth + 1)
                    finally:
                        os.close(sub)
                continue
            elif entry.is_file(follow_symlinks=False):
                src = open_file_at(dir_fd, entry.name, rel)
            else:
                continue  # sockets, fifos
        except (OSError, WorkspacePathError):
            continue  # vanished meanwhile, a link out, several hard links
        with os.fdopen(src, "rb") as handle:
            st = os.fstat(handle.fileno())
            info = zipfile.ZipInfo(rel, date_time=time.localtime(max(st.st_mtime, 315532800))[:6])
            info.external_attr = (st.st_mode & 0xFFFF) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w") as out:
                shutil.copyfileobj(handle, out, DOWNLOAD_CHUNK)


def _mkstemp(directory: Path) -> tuple[int, str]:
    import tempfile

    return tempfile.mkstemp(prefix="workspace-", suffix=".zip", dir=directory)


def workspace_tree(ctx: NodeContext) -> dict[str, Any]:
    """The workspace as nested ``{"name", "type", "path", "children" | "size"}``, capped in entries."""
    budget = [ctx.config.workspace_tree_max_entries]
    truncated = [False]

    def walk(dir_fd: int, prefix: str, depth: int) -> list[dict[str, Any]]:
        try:
            entries = sorted(scan(dir_fd), key=lambda e: (not e.is_dir(follow_symlinks=False), e.name))
        except OSError:
            return []
        children: list[dict[str, Any]] = []
        for entry in entries:
            if entry.name.startswith(UPLOAD_PREFIX):
                continue
            if budget[0] <= 0:
                truncated[0] = True
                break
            budget[0] -= 1
            rel = prefix + entry.name
            if entry.is_symlink():
                target = os.readlink(entry.name, dir_fd=dir_fd)
                children.append({"name": entry.name, "type": "symlink", "path": rel, "target": target})
            elif entry.is_dir(follow_symlinks=False):
                children.append(
                    {
                        "name": entry.name,
                        "type": "directory",
                        "path": rel,
                        "children": subtree(dir_fd, rel, depth),
                    }
                )
            else:
                try:
                    size = entry.stat(follow_symlinks=False).st_size
                except OSError:
                    size = None
                children.append({"name": entry.name, "type": "file", "path": rel, "size": size})
        return children

    def subtree(dir_fd: int, rel: str, depth: int) -> list[dict[str, Any]]:
        if depth >= 64:
            return []
        try:
            sub = open_subdir(dir_fd, rel.rsplit("/", 1)[-1], rel)
        except (OSError, WorkspacePathError):
            return []
        try:
            return walk(sub, rel + "/", depth + 1)
        finally:
            os.close(sub)

    with ctx.locate(".") as root:
        tree: dict[str, Any] = {
            "name": ctx.workspace.name,
            "type": "directory",
            "path": ".",
            "children": walk(root.dir_fd, "", 0),
        }
    if truncated[0]:
        tree["truncated"] = True
    return tree


def open_workspace_file(ctx: NodeContext, raw: str) -> tuple[BinaryIO, int, str]:
    """The workspace file ``raw`` opened for reading, with its size and name.

    FileNotFoundError, IsADirectoryError (not a regular file), WorkspacePathError (outside, a
    symlink swapped in, several hard links)."""
    with ctx.locate(raw) as where:
        handle = os.fdopen(where.open_file(), "rb")
        return handle, os.fstat(handle.fileno()).st_size, where.name or ""


def open_file_response(handle: BinaryIO, size: int, name: str) -> StreamingResponse:
    """Stream an open file (read in a worker thread, closed at the end or when the client leaves)."""
    import anyio.to_thread

    async def chunks() -> AsyncIterator[bytes]:
        try:
            left = size  # what the header promised: a file that grows meanwhile is cut there
            while left > 0:
                chunk = await anyio.to_thread.run_sync(handle.read, min(DOWNLOAD_CHUNK, left))
                if not chunk:
                    return  # truncated meanwhile: the answer ends short and the client sees it
                left -= len(chunk)
                yield chunk
        finally:
            handle.close()

    quoted = quote(name)
    disposition = (
        f'attachment; filename="{name}"' if quoted == name else f"attachment; filename*=utf-8''{quoted}"
    )
    media = mimetypes.guess_type(name)[0] or "application/octet-stream"
    headers = {"content-length": str(size), "content-disposition": disposition}
    return StreamingResponse(chunks(), media_type=media, headers=headers)


def _entry(dir_fd: int, prefix: str, entry: os.DirEntry[str]) -> dict[str, Any]:
    rel = prefix + entry.name
    if entry.is_symlink():
        return {"name": entry.name, "path": rel, "type": "symlink", "size": None}
    if entry.is_dir(follow_symlinks=False):
        return {"name": entry.name, "path": rel, "type": "directory", "size": None}
    is_file = entry.is_file(follow_symlinks=False)
    try:
        size = entry.stat(follow_symlinks=False).st_size if is_file else None
    except OSError:
        size = None
    return {"name": entry.name, "path": rel, "type": "file" if is_file else "other", "size": size}


def list_directory(ctx: NodeContext, raw: str) -> dict[str, Any]:
    """The entries of one workspace directory (not recursive), directories first, capped in number."""
    try:
        with opened_dir(ctx.workspace, raw) as (dir_fd, rel):
            limit = ctx.config.workspace_tree_max_entries
            entries = [e for e in scan(dir_fd) if not e.name.startswith(UPLOAD_PREFIX)]
            entries.sort(key=lambda e: (not e.is_dir(follow_symlinks=False), e.name))
            prefix = "" if rel == "." else rel + "/"
            answer: dict[str, Any] = {
                "path": rel,
                "entries": [_entry(dir_fd, prefix, e) for e in entries[:limit]],
            }
    except FileNotFoundError:
        raise HTTPException(404, f"{raw!r} not found in the workspace") from None
    except NotADirectoryError:
        raise HTTPException(400, f"{raw!r} is not a directory") from None
    if len(entries) > limit:
        answer["truncated"] = True
    return answer


def stat_path(ctx: NodeContext, raw: str) -> dict[str, Any]:
    """Whether a workspace path exists, and what it is (a symlink is followed beneath the workspace)."""
    try:
        with ctx.locate(raw) as where:
            st, rel = where.lstat(), where.rel
    except (FileNotFoundError, NotADirectoryError):
        st, rel = None, raw
    if st is None:
        return {"path": rel, "exists": False}
    kind = "directory" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else "other"
    return {
        "path": rel,
        "exists": True,
        "type": kind,
        "size": st.st_size if kind == "file" else None,
        "modified": st.st_mtime,
    }


def remove_path(ctx: NodeContext, raw: str, recursive: bool) -> dict[str, Any]:
    """Remove a file, a symlink (not what it points to) or, with ``recursive``, a directory tree."""
    text = raw.strip().replace("\\", "/").rstrip("/")
    head, _, name = text.rpartition("/")
    if name in ("", ".", "..") or "\x00" in name:
        raise HTTPException(400, f"{raw!r} names no entry that can be removed (the workspace itself?)")
    try:
        with opened_dir(ctx.workspace, head or ".") as (dir_fd, parent):
            rel = name if parent == "." else f"{parent}/{name}"
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                raise HTTPException(404, f"{raw!r} not found in the workspace") from None
            if not stat.S_ISDIR(st.st_mode):
                os.unlink(name, dir_fd=dir_fd)
            elif recursive:
                shutil.rmtree(name, dir_fd=dir_fd)
            else:
                try:
                    os.rmdir(name, dir_fd=dir_fd)
                except OSError:
                    raise HTTPException(
                        409, f"{raw!r} is a directory that is not empty; remove it with recursive=true"
                    ) from None
    except (FileNotFoundError, NotADirectoryError):
        raise HTTPException(404, f"{raw!r} not found in the workspace") from None
    return {"path": rel, "removed": True}
