"""The SDK's half without I/O: request bodies, answers parsed, error answers raised as typed errors.

The sync and the async client are thin layers over these functions: one place decides what a call
sends and what an answer means.
"""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import PurePosixPath
from typing import Any

import httpx

from toolserver.client.results import (
    BinaryOutput,
    CommandResult,
    FileInfo,
    PythonResult,
    SessionInfo,
    SessionState,
    from_json,
)
from toolserver.errors import (
    AccessDeniedError,
    BadArgumentsError,
    CapacityExceededError,
    ClientError,
    NodeNotReadyError,
    NotFoundError,
    OutputNotReadyError,
    SessionNotFoundError,
    StreamBrokenError,
    ToolFailedError,
    ToolNotFoundError,
)
from toolserver.protocol import COOKIE_NAME

DEFAULT_URL = "http://127.0.0.1:8080"
#: Environment variable holding the API key when none is given.
API_KEY_ENV = "TOOLSERVER_API_KEY"
#: Reads wait up to 10 minutes (streamed commands send a keep-alive line every 15 s).
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)
#: The notebook tool behind ``Session.python``.
NOTEBOOK_TOOL = "PythonNotebook_execute_cell"
_QUOTED = re.compile(r"'([^']+)'")
_CELL = re.compile(r"^cell_index: (-?\d+)")


def auth_headers(api_key: str | None) -> dict[str, str]:
    """The ``Authorization`` header for ``api_key`` (else ``$TOOLSERVER_API_KEY``), or none."""
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    return {"Authorization": f"Bearer {key}"} if key else {}


def unwrap(obj: Any) -> Any:
    """Turn a wrapped tool result into Python values (binary data decoded to bytes)."""
    if isinstance(obj, dict) and obj.get("type") in ("simple", "binary", "composite") and "data" in obj:
        if obj["type"] == "simple":
            return obj["data"]
        if obj["type"] == "binary":
            return BinaryOutput(
                obj.get("media_type", "application/octet-stream"),
                obj.get("name") or "",
                base64.b64decode(obj["data"]),
            )
        return [unwrap(o) for o in obj["data"]]
    return obj


# ---- errors --------------------------------------------------------------------------------------


def _body(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return resp.text


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after", "")
    try:
        return float(value)
    except ValueError:
        return None


def error_for(resp: httpx.Response) -> ClientError:
    """The typed error for an error answer (its body read already)."""
    body = _body(resp)
    detail = body.get("detail", body) if isinstance(body, dict) else body
    text = detail if isinstance(detail, str) else json.dumps(detail)
    path = resp.request.url.path
    message = f"{resp.request.method} {path}: {resp.status_code} {text}"
    status = resp.status_code
    kwargs: dict[str, Any] = {"retry_after": _retry_after(resp)}
    cls: type[ClientError] = ClientError
    if status == 403 and "invalid node_id" in text:
        cls = SessionNotFoundError
    elif status in (401, 403):
        cls = AccessDeniedError
    elif status == 429:
        cls = CapacityExceededError
    elif status in (503, 504):
        cls = NodeNotReadyError
    elif status == 404:
        cls = ToolNotFoundError if path == "/execute_tool" else NotFoundError
    elif status in (400, 422):
        cls = BadArgumentsError
        quoted = _QUOTED.search(text)
        kwargs["field"] = quoted.group(1) if quoted else None
    elif status == 450:
        cls = OutputNotReadyError
        kwargs["partial"] = (
            {k: v for k, v in body.items() if k != "detail"} if isinstance(body, dict) else None
        )
    elif status == 500 and path == "/execute_tool":
        cls = ToolFailedError
    return cls(message, status, detail, **kwargs)


def check(resp: httpx.Response) -> httpx.Response:
    """``resp`` itself, or its typed error raised; the body must have been read."""
    if resp.status_code >= 400:
        raise error_for(resp)
    return resp


# ---- sessions ------------------------------------------------------------------------------------


def cookie_headers(session_id: str) -> dict[str, str]:
    return {"Cookie": f"{COOKIE_NAME}={session_id}"}


def new_session_id(resp: httpx.Response) -> str:
    """The cookie of a ``/get_cookie`` answer."""
    session_id = check(resp).cookies.get(COOKIE_NAME)
    if not session_id:
        raise ClientError("the manager answered /get_cookie without a node_id cookie", resp.status_code)
    return session_id


def session_options(
    labels: dict[str, str] | None, timeout: float | None, options: dict[str, Any]
) -> dict[str, Any] | None:
    """The ``/get_cookie`` body (None: no body, as XAgent sends). ``timeout`` is the session's
    lifetime in seconds; other options go as they are (``idle_seconds``, ``env``, ...)."""
    body = {k: v for k, v in options.items() if v is not None}
    if labels:
        body["labels"] = dict(labels)
    if timeout is not None:
        body["timeout_seconds"] = timeout
    return body or None


def session_state(resp: httpx.Response) -> SessionState:
    return from_json(SessionState, check(resp).json())


def fork_body(labels: dict[str, str] | None, timeout: float | None) -> dict[str, Any] | None:
    """The ``/fork_session`` body: the new session's labels and lifetime (None: the source's labels)."""
    body: dict[str, Any] = {}
    if labels is not None:
        body["labels"] = dict(labels)
    if timeout is not None:
        body["timeout_seconds"] = timeout
    return body or None


def label_params(labels: dict[str, str] | None) -> list[tuple[str, str]]:
    return [("label", f"{k}={v}") for k, v in (labels or {}).items()]


def sessions_from(resp: httpx.Response) -> list[SessionInfo]:
    return [from_json(SessionInfo, s) for s in check(resp).json()["sessions"]]


def tool_payload(tool_name: str, arguments: dict[str, Any] | None, env_name: str | None) -> dict[str, Any]:
    payload: dict[str, Any] = {"tool_name": tool_name, "arguments": arguments or {}}
    if env_name:
        payload["env_name"] = env_name
    return payload


# ---- commands ------------------------------------------------------------------------------------


def command_body(
    command: str,
    *,
    background: bool,
    timeout: float | None,
    stdin: bool,
    cwd: str | None,
    env: dict[str, str] | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"command": command, "background": background, "stdin": stdin}
    for key, value in (("timeout", timeout), ("cwd", cwd), ("env", env)):
        if value is not None:
            body[key] = value
    return body


def connect_body(command_id: int, from_start: bool = True, follow: bool = True) -> dict[str, Any]:
    return {"id": command_id, "from": "start" if from_start else "now", "follow": follow}


class CommandEvents:
    """Folds the NDJSON events of a command stream into its :class:`CommandResult`."""

    def __init__(self) -> None:
        self.id = -1
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.exit_code: int | None = None
        self.status: str | None = None
        self.dropped = 0

    def feed(self, line: str) -> tuple[str, str] | None:
        """Take one line; returns ``(stream, text)`` for output (for the caller's callback)."""
        if not line.strip():
            return None
        event = json.loads(line)
        kind = event.get("type")
        if kind in ("stdout", "stderr"):
            (self.stdout if kind == "stdout" else self.stderr).append(event["data"])
            return kind, event["data"]
        if kind == "start":
            self.id = event["id"]
        elif kind == "exit":
            self.exit_code, self.status = event.get("exit_code"), event.get("status", "exited")
        elif kind == "detached":
            self.status = event.get("status", "running")
        elif kind == "dropped":
            self.dropped += int(event.get("chars", 0))
        return None

    def result(self) -> CommandResult:
        if self.status is None:
            raise broken_stream(self, None)
        return CommandResult(
            self.id, "".join(self.stdout), "".join(self.stderr), self.exit_code, self.status, self.dropped
        )


def broken_stream(events: CommandEvents, cause: Exception | None) -> StreamBrokenError:
    """The error for a command stream that ended before its last event."""
    why = f" ({cause})" if cause is not None else ""
    return StreamBrokenError(
        f"the output stream of command {events.id} ended before the command did{why}; "
        "reattach with session.commands.connect(id)"
    )


# ---- notebook and files --------------------------------------------------------------------------


def python_result(answer: Any) -> PythonResult:
    """A notebook cell's answer: its first part says the cell index, then text and images."""
    parts = unwrap(answer)
    parts = parts if isinstance(parts, list) else [parts]
    index = None
    if parts and isinstance(parts[0], str) and (match := _CELL.match(parts[0])):
        index = int(match.group(1))
        parts = parts[1:]
    text = "".join(p if isinstance(p, str) else "" for p in parts)
    images = [p for p in parts if isinstance(p, BinaryOutput)]
    return PythonResult(text, images, None, index)


def python_error(exc: ToolFailedError) -> PythonResult | None:
    """The result of a cell that raised (the node's 500 names the cell), else None."""
    detail = exc.body if isinstance(exc.body, str) else ""
    match = _CELL.match(detail)
    if match is None:
        return None
    return PythonResult("", [], detail[match.end() :].lstrip(": \n"), int(match.group(1)))


def upload_form(path: str) -> tuple[str, dict[str, str]]:
    """File name and form fields that put an upload at workspace path ``path``."""
    name = PurePosixPath(path.replace("\\", "/")).name
    if not name:
        raise ValueError(f"{path!r} names no file")
    return name, {"path": path}


def file_infos(resp: httpx.Response) -> list[FileInfo]:
    return [FileInfo.from_json(e) for e in check(resp).json()["entries"]]
