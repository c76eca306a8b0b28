"""The client commands of ``toolserver``: sessions, tools, exec, uploads and downloads through the SDK.

Imports only the SDK (httpx), never the manager or FastAPI, so that every command starts quickly.
Expected failures end with one line on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mimetypes
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from toolserver.client import DEFAULT_URL, BinaryOutput, Session, ToolServerClient, unwrap
from toolserver.errors import ClientError

#: Environment variable naming the manager when ``--url`` is not given.
URL_ENV = "TOOLSERVER_URL"


def resolve_url(url: str | None) -> str:
    """``url``, else ``$TOOLSERVER_URL``, else the SDK's default."""
    return url or os.environ.get(URL_ENV) or DEFAULT_URL


def _print(value: Any) -> None:
    """A string as it is, anything else as indented JSON."""
    text = value if isinstance(value, str) else json.dumps(value, indent=2, ensure_ascii=False)
    print(text, end="" if text.endswith("\n") else "\n")


def _note(message: str) -> None:
    print(f"toolserver: {message}", file=sys.stderr)


@contextlib.contextmanager
def _session(client: ToolServerClient, node_id: str | None) -> Iterator[Session]:
    """The session ``node_id``, or a temporary one released afterwards (also on error)."""
    if node_id:
        yield client.attach(node_id)
    else:
        with client.session() as session:
            yield session


def _session_command(client: ToolServerClient, args: argparse.Namespace) -> None:
    if args.action == "new":
        print(client.get_cookie().node_id)
    else:  # reconnect, close, release: the Session methods of the same names
        getattr(client.attach(args.node_id), args.action)()


def _tools(client: ToolServerClient, args: argparse.Namespace) -> None:
    with _session(client, args.session) as session:
        answer = (
            session.retrieve_tools(args.search, args.top_k) if args.search else session.get_available_tools()
        )
    if args.json:
        _print(answer)
        return
    tools = answer.get("tools_json", [])
    width = max((len(t["name"]) for t in tools), default=0)
    for tool in tools:
        lines = (tool.get("description") or "").strip().splitlines()
        print(f"{tool['name']:<{width}}  {lines[0] if lines else ''}".rstrip())


def _binary_dest(part: BinaryOutput, index: int, out: Path | None, several: bool) -> Path:
    """Where a binary result goes: ``out``, or its own name (never a path) here or in directory ``out``."""
    name = Path(part.name or "").name
    if name in ("", ".."):
        name = f"output{index or ''}{mimetypes.guess_extension(part.media_type) or '.bin'}"
    if out is None:
        return Path(name)
    if several or out.is_dir():
        out.mkdir(parents=True, exist_ok=True)
        return out / name
    return out


def _exec(client: ToolServerClient, args: argparse.Namespace) -> None:
    arguments: dict[str, Any] = {}
    for part in args.args:  # each a dict parsed by the command line
        arguments.update(part)
    with _session(client, args.session) as session:
        result = unwrap(session.execute_tool(args.tool, arguments))
    has_binary = isinstance(result, list) and any(isinstance(p, BinaryOutput) for p in result)
    parts = result if has_binary else [result]
    several = sum(isinstance(p, BinaryOutput) for p in parts) > 1
    written = 0
    for part in parts:
        if isinstance(part, BinaryOutput):
            dest = _binary_dest(part, written, args.out, several)
            written += 1
            dest.write_bytes(part.data)
            _note(f"wrote {len(part.data)} bytes ({part.media_type}) to {dest}")
        else:
            _print(part)


def _run(client: ToolServerClient, args: argparse.Namespace) -> int:
    """Stream a command's stdout and stderr to ours as it prints; exit with its exit status."""

    def out(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def err(text: str) -> None:
        sys.stderr.write(text)
        sys.stderr.flush()

    words = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not words:
        _note("run: give the command to run, e.g. toolserver run -- ls -la")
        return 2
    with _session(client, args.session) as session:
        result = session.run(" ".join(words), on_stdout=out, on_stderr=err, timeout=args.timeout)
    if result.status == "timeout":
        _note(f"the command was killed after {args.timeout:g} s (--timeout)")
    code = result.exit_code if result.exit_code is not None else 1
    return code if code >= 0 else 128 - code


def _shell(client: ToolServerClient, args: argparse.Namespace) -> int:
    from toolserver.client import terminal

    client.connect(args.node_id).commands.list()  # a missing session fails here, with the reason
    return terminal.run(client.base_url, args.node_id, client.api_key)


def _sessions(client: ToolServerClient, args: argparse.Namespace) -> None:
    labels: dict[str, str] = {}
    for item in args.label:
        labels.update(item)
    sessions = client.list_sessions(labels)
    if args.json:
        _print([vars(s) for s in sessions])
        return
    for s in sessions:
        tags = ",".join(f"{k}={v}" for k, v in s.labels.items()) or "-"
        print(f"{s.session_id}  {s.status:<8} {s.health:<9} {s.created_at}  {tags}")


def _upload(client: ToolServerClient, args: argparse.Namespace) -> None:
    answer = client.attach(args.node_id).upload_file(args.file, args.name)
    _print(answer.get("file_path", answer) if isinstance(answer, dict) else answer)


def _download(client: ToolServerClient, args: argparse.Namespace) -> None:
    dest = client.attach(args.node_id).download_file(args.path, args.dest or Path(args.path).name)
    _note(f"wrote {dest.stat().st_size} bytes to {dest}")


def _download_workspace(client: ToolServerClient, args: argparse.Namespace) -> None:
    dest = client.attach(args.node_id).download_workspace(args.dest)
    _note(f"wrote {dest.stat().st_size} bytes to {dest}")


COMMANDS: dict[str, Callable[[ToolServerClient, argparse.Namespace], int | None]] = {
    "session": _session_command,
    "sessions": _sessions,
    "run": _run,
    "shell": _shell,
    "tools": _tools,
    "exec": _exec,
    "upload": _upload,
    "download": _download,
    "download-workspace": _download_workspace,
}


def run(args: argparse.Namespace) -> int:
    """Run the client command ``args.command``; returns the exit status."""
    url = resolve_url(args.url)
    try:
        with ToolServerClient(url, api_key=getattr(args, "api_key", None)) as client:
            status = COMMANDS[args.command](client, args)
    except ClientError as exc:
        if exc.body is None:  # not an error answer (no cookie in a 200, say)
            _note(str(exc))
        else:
            detail = exc.body if isinstance(exc.body, str) else json.dumps(exc.body, ensure_ascii=False)
            _note(f"{exc.status_code} {detail}")
    except httpx.TransportError as exc:
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            _note(f"cannot reach the manager at {url}: {reason}")
        else:
            _note(f"request to the manager at {url} failed: {reason}")
    except OSError as exc:  # a local file: missing, unreadable, not writable
        _note(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
    except KeyboardInterrupt:
        return 130
    else:
        return status or 0
    return 1
