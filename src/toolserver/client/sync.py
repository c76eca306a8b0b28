"""The synchronous SDK: :class:`ToolServerClient`, its :class:`Session`, commands and files."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import httpx

from toolserver.client import _wire as wire
from toolserver.client.results import (
    CommandInfo,
    CommandResult,
    FileInfo,
    PythonResult,
    SessionInfo,
    SessionState,
    from_json,
)
from toolserver.errors import ClientError, ToolFailedError

Callback = Callable[[str], Any] | None


class CommandHandle:
    """A background command: wait for it, read its output so far, write its stdin, kill it."""

    def __init__(self, session: Session, command_id: int, command: str = "") -> None:
        self._session = session
        self.id = command_id
        self.command = command

    def wait(self, on_stdout: Callback = None, on_stderr: Callback = None) -> CommandResult:
        """Follow the command from the start of its output until it ends."""
        return self._session._follow("/commands/connect", wire.connect_body(self.id), on_stdout, on_stderr)

    def output(self) -> CommandResult:
        """The output so far, at once (``status`` is ``running`` while it runs)."""
        body = wire.connect_body(self.id, follow=False)
        return self._session._follow("/commands/connect", body, None, None)

    def send_stdin(self, data: str, eof: bool = False) -> None:
        """Write ``data`` to its stdin (started with ``stdin=True``); ``eof`` closes stdin afterwards."""
        self._session._post("/commands/stdin", json={"id": self.id, "data": data, "eof": eof})

    def kill(self) -> CommandInfo:
        """Stop it and everything it started (SIGTERM, then SIGKILL)."""
        return from_json(CommandInfo, self._session._post("/commands/kill", json={"id": self.id}).json())


class Commands:
    """``session.commands``: the session's commands."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def list(self) -> list[CommandInfo]:
        resp = wire.check(self._session._http.get("/commands", headers=self._session._headers))
        return [from_json(CommandInfo, c) for c in resp.json()["commands"]]

    def connect(self, command_id: int) -> CommandHandle:
        """A handle on a command that runs (or ran) in the session, e.g. a shell tool's ``shell_id``."""
        return CommandHandle(self._session, command_id)


class Files:
    """``session.files``: the session's workspace (paths relative to it); transfers are streamed."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def read(self, path: str) -> bytes:
        return self._session._post("/download_file", json={"file_path": path}).content

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return self.read(path).decode(encoding)

    def download(self, path: str, dest: str | Path) -> Path:
        """Stream workspace file ``path`` to local ``dest``."""
        return self._session.download_file(path, dest)

    def write(self, path: str, data: bytes | str | IO[bytes]) -> str:
        """Write ``data`` (a file object is streamed) to workspace ``path``; returns the path."""
        name, form = wire.upload_form(path)
        content = data.encode() if isinstance(data, str) else data
        resp = self._session._post("/upload_file", files={"file": (name, content)}, data=form)
        return str(resp.json()["file_path"])

    def upload(self, local: str | Path, path: str | None = None) -> str:
        """Stream local file ``local`` to workspace ``path`` (default: its name at the root)."""
        local = Path(local)
        with local.open("rb") as fh:
            return self.write(path or local.name, fh)

    def list(self, path: str = ".") -> list[FileInfo]:
        return wire.file_infos(self._session._post("/files/list", json={"path": path}))

    def exists(self, path: str) -> bool:
        return bool(self._session._post("/files/stat", json={"path": path}).json()["exists"])

    def remove(self, path: str, recursive: bool = False) -> None:
        self._session._post("/files/remove", json={"path": path, "recursive": recursive})


class Session:
    """One session (one node) of a :class:`ToolServerClient`; ``session_id`` is its cookie.

    Used as a context manager, it is released on exit.
    """

    def __init__(self, http: httpx.Client, session_id: str) -> None:
        self._http = http
        self.session_id = session_id
        self._headers = wire.cookie_headers(session_id)
        self.files = Files(self)
        self.commands = Commands(self)

    @property
    def node_id(self) -> str:
        """The session id under XAgent's name for it."""
        return self.session_id

    def _post(self, path: str, **kwargs: Any) -> httpx.Response:
        return wire.check(self._http.post(path, headers=self._headers, **kwargs))

    # ---- commands and Python ----------------------------------------------------------------------

    def run(
        self,
        command: str,
        *,
        on_stdout: Callback = None,
        on_stderr: Callback = None,
        background: bool = False,
        timeout: float | None = None,
        stdin: bool = False,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
    ) -> Any:
        """Run ``command`` with bash in the workspace; its output reaches the callbacks as it is printed.

        Returns a :class:`CommandResult` once it ends, or at once a :class:`CommandHandle` with
        ``background=True``. ``timeout`` kills it after that many seconds (status ``timeout``);
        ``stdin=True`` (background) lets ``handle.send_stdin`` write to it.
        """
        body = wire.command_body(
            command, background=background, timeout=timeout, stdin=stdin, cwd=cwd, env=env
        )
        if background:
            return CommandHandle(self, self._post("/commands", json=body).json()["id"], command)
        return self._follow("/commands", body, on_stdout, on_stderr)

    def _follow(
        self, path: str, body: dict[str, Any], on_stdout: Callback, on_stderr: Callback
    ) -> CommandResult:
        events = wire.CommandEvents()
        callbacks = {"stdout": on_stdout, "stderr": on_stderr}
        with self._http.stream("POST", path, json=body, headers=self._headers) as resp:
            if resp.status_code >= 400:
                resp.read()
                wire.check(resp)
            try:
                for line in resp.iter_lines():
                    output = events.feed(line)
                    if output is not None and (callback := callbacks[output[0]]) is not None:
                        callback(output[1])
            except httpx.TransportError as exc:  # cut while streaming (the node went away, say)
                raise wire.broken_stream(events, exc) from exc
        return events.result()

    def python(self, code: str) -> PythonResult:
        """Run ``code`` in the session's notebook kernel (state kept between calls)."""
        try:
            answer = self.execute_tool(wire.NOTEBOOK_TOOL, {"code": code})
        except ToolFailedError as exc:
            failed = wire.python_error(exc)
            if failed is None:
                raise
            return failed
        return wire.python_result(answer)

    # ---- XAgent's node API --------------------------------------------------------------------------

    def execute_tool(
        self, tool_name: str, arguments: dict[str, Any] | None = None, env_name: str | None = None
    ) -> Any:
        """Run a tool; returns its (wrapped) JSON result. See :func:`unwrap`."""
        return self._post("/execute_tool", json=wire.tool_payload(tool_name, arguments, env_name)).json()

    def get_available_tools(self) -> dict[str, Any]:
        return self._post("/get_available_tools", json={}).json()

    def retrieve_tools(self, question: str, top_k: int = 5) -> dict[str, Any]:
        return self._post("/retrieving_tools", json={"question": question, "top_k": top_k}).json()

    def get_json_schema_for_tools(self, tool_names: list[str]) -> dict[str, Any]:
        return self._post("/get_json_schema_for_tools", json={"tool_names": tool_names}).json()

    def get_workspace_structure(self) -> Any:
        return self._post("/get_workspace_structure").json()

    def upload_file(self, path: str | Path, filename: str | None = None) -> Any:
        """Upload a local file (streamed) into the node's workspace."""
        path = Path(path)
        with path.open("rb") as fh:
            return self._post("/upload_file", files={"file": (filename or path.name, fh)}).json()

    def download_file(self, file_path: str, dest: str | Path) -> Path:
        """Stream a workspace file to ``dest``."""
        return self._download("/download_file", {"file_path": file_path}, Path(dest))

    def download_workspace(self, dest: str | Path) -> Path:
        """Stream the whole workspace as a zip file to ``dest``."""
        return self._download("/download_workspace", None, Path(dest))

    def _download(self, path: str, payload: dict[str, Any] | None, dest: Path) -> Path:
        with self._http.stream("POST", path, json=payload, headers=self._headers) as resp:
            if resp.status_code >= 400:
                resp.read()
                wire.check(resp)
            with dest.open("wb") as out:
                for chunk in resp.iter_bytes(1 << 20):
                    out.write(chunk)
        return dest

    # ---- lifecycle ----------------------------------------------------------------------------------

    def reconnect(self) -> None:
        """Restart the node (workspace kept) and wait until it serves."""
        self._post("/reconnect_session")

    def pause(self) -> SessionState:
        """Freeze the node with its memory; the next request (or :meth:`resume`) thaws it."""
        return wire.session_state(self._post("/pause_session"))

    def resume(self) -> SessionState:
        """Thaw a paused node: processes and memory as they were."""
        return wire.session_state(self._post("/resume_session"))

    def extend(self, timeout: float) -> SessionState:
        """Make the session expire ``timeout`` seconds from now."""
        return wire.session_state(self._post("/extend_session", json={"timeout_seconds": timeout}))

    def fork(self, *, labels: dict[str, str] | None = None, timeout: float | None = None) -> Session:
        """A new session starting from a copy of this one's workspace (Docker: and of its
        container's filesystem); memory is not forked. ``labels`` default to this session's."""
        resp = self._post("/fork_session", json=wire.fork_body(labels, timeout))
        return Session(self._http, wire.new_session_id(resp))

    def close(self) -> None:
        """Stop the node; ``reconnect`` starts it again."""
        self._post("/close_session")

    def release(self) -> None:
        """Kill and remove the node for good."""
        self._post("/release_session")

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(ClientError, httpx.HTTPError):
            self.release()


class ToolServerClient:
    """Synchronous client of a ToolServer manager."""

    def __init__(
        self,
        base_url: str = wire.DEFAULT_URL,
        timeout: float | httpx.Timeout = wire.DEFAULT_TIMEOUT,
        api_key: str | None = None,
    ) -> None:
        self.base_url = base_url
        self.api_key = api_key
        headers = wire.auth_headers(api_key)
        self._http = httpx.Client(base_url=base_url, timeout=timeout, trust_env=False, headers=headers)

    def alive(self) -> bool:
        return self._http.get("/alive").status_code == 200

    def create_session(
        self, *, labels: dict[str, str] | None = None, timeout: float | None = None, **options: Any
    ) -> Session:
        """Start a session (a node, ready when this returns); release it, or use it in ``with``.

        ``labels`` tag it (``list_sessions`` filters on them); ``timeout`` is its lifetime in seconds;
        further options (``idle_seconds``, ``env``, ...) go to the manager as they are, which refuses
        those it does not know.
        """
        body = wire.session_options(labels, timeout, options)
        return Session(self._http, wire.new_session_id(self._http.post("/get_cookie", json=body)))

    def connect(self, session_id: str) -> Session:
        """A handle on an existing session (no request is made: a wrong id fails on first use)."""
        return Session(self._http, session_id)

    def list_sessions(self, labels: dict[str, str] | None = None) -> list[SessionInfo]:
        """Your sessions, those carrying every one of ``labels`` when given."""
        return wire.sessions_from(self._http.get("/sessions", params=wire.label_params(labels)))

    def get_cookie(self, labels: dict[str, str] | None = None) -> Session:
        """Start a new session (XAgent's name for :meth:`create_session`)."""
        return self.create_session(labels=labels)

    def attach(self, node_id: str) -> Session:
        """A handle on an existing session (the former name of :meth:`connect`)."""
        return self.connect(node_id)

    @contextlib.contextmanager
    def session(self, **options: Any) -> Iterator[Session]:
        """A session released on exit; ``options`` as for :meth:`create_session`."""
        with self.create_session(**options) as session:
            yield session

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ToolServerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
