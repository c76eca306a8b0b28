"""Moving files in and out of the workspace: streamed multipart upload, zip of the workspace, tree listing.

Uploads are parsed chunk by chunk (python-multipart) and written to a temporary file inside the
workspace, then renamed into place; nothing is held in memory and the size limit is enforced while
reading. The workspace zip is built in a worker thread into the node's state dir (outside the
workspace) and streamed from there.
"""

from __future__ import annotations

import mimetypes
import os
import stat
import uuid
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import StreamingResponse

from toolserver.node.context import NodeContext

UPLOAD_PREFIX = ".toolserver-upload-"
DOWNLOAD_CHUNK = 256 * 1024
_FIELD_MAX = 4096
_MULTIPART_SLACK = 1 << 20  # headers and boundaries around the file's bytes
_FORBIDDEN_CHARS = set('<>:"|?*')


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
    tmp = ctx.workspace / f"{UPLOAD_PREFIX}{uuid.uuid4().hex}.part"
    handle = None
    size = received = 0
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
                    handle = await anyio.to_thread.run_sync(tmp.open, "wb")
                await anyio.to_thread.run_sync(handle.write, data)
        try:
            parser.finalize()
        except Exception as exc:
            raise HTTPException(400, f"malformed multipart body: {exc}") from None
        file_part = state["file_part"]
        if file_part is None:
            raise HTTPException(400, "the upload has no 'file' part")
        if handle is None:
            handle = await anyio.to_thread.run_sync(tmp.open, "wb")
        await anyio.to_thread.run_sync(handle.close)
        name = sanitize_filename(fields.get("filename") or file_part.filename or "")
        target = _upload_target(ctx, fields.get("path"), name)
        await anyio.to_thread.run_sync(_move_into_place, tmp, target)
    finally:
        if handle is not None and not handle.closed:
            handle.close()
        tmp.unlink(missing_ok=True)
    return {"message": "Upload Success!", "file_path": ctx.relative(target), "size": size}


def _upload_target(ctx: NodeContext, path: str | None, name: str) -> Path:
    if not path:
        directory, filename = ctx.workspace, name
    else:
        resolved = ctx.resolve(path)
        if path.endswith(("/", "\\")) or resolved.is_dir():
            directory, filename = resolved, name
        else:
            directory, filename = resolved.parent, resolved.name
    target = directory / filename
    real = Path(os.path.realpath(target))
    if not real.is_relative_to(ctx.workspace) or real == ctx.workspace:
        raise HTTPException(400, f"upload target {ctx.relative(target)!r} leads outside the workspace")
    if target.is_dir():
        raise HTTPException(400, f"upload target {ctx.relative(target)!r} is a directory")
    return target


def _move_into_place(tmp: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)


def build_workspace_zip(ctx: NodeContext) -> Path:
    """Zip the workspace into a temp file in the state dir; symlinks leading out are left out."""
    ws = ctx.workspace
    fd, name = _mkstemp(ctx.tmp_dir)
    path = Path(name)
    try:
        with (
            os.fdopen(fd, "wb") as raw,
            zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf,
        ):
            for root, dirs, files in os.walk(ws):
                root_path = Path(root)
                dirs[:] = sorted(d for d in dirs if not (root_path / d).is_symlink())
                rel_root = root_path.relative_to(ws)
                if rel_root != Path(".") and not dirs and not files:
                    zf.write(root_path, rel_root.as_posix() + "/")
                for fname in sorted(files):
                    full = root_path / fname
                    if fname.startswith(UPLOAD_PREFIX):
                        continue
                    if full.is_symlink():
                        real = Path(os.path.realpath(full))
                        if not real.is_relative_to(ws) or not real.is_file():
                            continue
                    elif not full.is_file():
                        continue  # sockets, fifos
                    try:
                        zf.write(full, (rel_root / fname).as_posix())
                    except OSError:
                        continue  # vanished or unreadable meanwhile
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _mkstemp(directory: Path) -> tuple[int, str]:
    import tempfile

    return tempfile.mkstemp(prefix="workspace-", suffix=".zip", dir=directory)


def workspace_tree(ctx: NodeContext) -> dict[str, Any]:
    """The workspace as nested ``{"name", "type", "path", "children" | "size"}``, capped in entries."""
    budget = [ctx.config.workspace_tree_max_entries]
    truncated = [False]

    def walk(directory: Path, depth: int) -> list[dict[str, Any]]:
        try:
            entries = sorted(
                os.scandir(directory), key=lambda e: (not e.is_dir(follow_symlinks=False), e.name)
            )
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
            rel = ctx.relative(Path(entry.path))
            if entry.is_symlink():
                children.append(
                    {"name": entry.name, "type": "symlink", "path": rel, "target": os.readlink(entry.path)}
                )
            elif entry.is_dir():
                sub = walk(Path(entry.path), depth + 1) if depth < 64 else []
                children.append({"name": entry.name, "type": "directory", "path": rel, "children": sub})
            else:
                try:
                    size = entry.stat().st_size
                except OSError:
                    size = None
                children.append({"name": entry.name, "type": "file", "path": rel, "size": size})
        return children

    tree: dict[str, Any] = {
        "name": ctx.workspace.name,
        "type": "directory",
        "path": ".",
        "children": walk(ctx.workspace, 0),
    }
    if truncated[0]:
        tree["truncated"] = True
    return tree


def open_regular_file(path: Path) -> tuple[BinaryIO, int]:
    """``path`` opened for reading, with its size; IsADirectoryError for anything but a regular file."""
    handle = path.open("rb")
    try:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise IsADirectoryError(f"{path} is not a regular file")
    except BaseException:
        handle.close()
        raise
    return handle, info.st_size


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


def _entry(ctx: NodeContext, entry: os.DirEntry[str]) -> dict[str, Any]:
    rel = ctx.relative(Path(entry.path))
    if entry.is_symlink():
        return {"name": entry.name, "path": rel, "type": "symlink", "size": None}
    if entry.is_dir():
        return {"name": entry.name, "path": rel, "type": "directory", "size": None}
    try:
        size = entry.stat().st_size if entry.is_file() else None
    except OSError:
        size = None
    return {"name": entry.name, "path": rel, "type": "file" if entry.is_file() else "other", "size": size}


def list_directory(ctx: NodeContext, raw: str) -> dict[str, Any]:
    """The entries of one workspace directory (not recursive), directories first, capped in number."""
    directory = ctx.resolve(raw)
    if not directory.exists():
        raise HTTPException(404, f"{raw!r} not found in the workspace")
    if not directory.is_dir():
        raise HTTPException(400, f"{raw!r} is not a directory")
    limit = ctx.config.workspace_tree_max_entries
    with os.scandir(directory) as it:
        entries = [e for e in it if not e.name.startswith(UPLOAD_PREFIX)]
    entries.sort(key=lambda e: (not e.is_dir(follow_symlinks=False), e.name))
    answer: dict[str, Any] = {
        "path": ctx.relative(directory),
        "entries": [_entry(ctx, e) for e in entries[:limit]],
    }
    if len(entries) > limit:
        answer["truncated"] = True
    return answer


def stat_path(ctx: NodeContext, raw: str) -> dict[str, Any]:
    """Whether a workspace path exists, and what it is."""
    path = ctx.resolve(raw)
    try:
        st = path.stat()
    except FileNotFoundError:
        return {"path": ctx.relative(path), "exists": False}
    kind = "directory" if path.is_dir() else "file" if path.is_file() else "other"
    return {
        "path": ctx.relative(path),
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
    target = ctx.resolve(head or ".") / name
    if not os.path.lexists(target):
        raise HTTPException(404, f"{raw!r} not found in the workspace")
    if target.is_symlink() or not target.is_dir():
        target.unlink()
    elif recursive:
        import shutil

        shutil.rmtree(target)
    else:
        try:
            target.rmdir()
        except OSError:
            raise HTTPException(
                409, f"{raw!r} is a directory that is not empty; remove it with recursive=true"
            ) from None
    return {"path": ctx.relative(target), "removed": True}
