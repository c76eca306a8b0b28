"""The asynchronous SDK: :class:`AsyncToolServerClient`, its :class:`AsyncSession`, commands and files.

The same calls as :mod:`toolserver.client.sync`, awaited; output callbacks may be coroutine functions.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Callable
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


class AsyncCommandHandle:
    """A background command: wait for it, read its output so far, write its stdin, kill it."""

    def __init__(self, session: AsyncSession, command_id: int, command: str = "") -> None:
        self._session = session
        self.id = command_id
        self.command = command

    async def wait(self, on_stdout: Callback = None, on_stderr: Callback = None) -> CommandResult:
        """Follow the command from the start of its output until it ends."""
        body = wire.connect_body(self.id)
        return await self._session._follow("/commands/connect", body, on_stdout, on_stderr)

    async def output(self) -> CommandResult:
        """The output so far, at once (``status`` is ``running`` while it runs)."""
        body = wire.connect_body(self.id, follow=False)
        return await self._session._follow("/commands/connect", body, None, None)

    async def send_stdin(self, data: str, eof: bool = False) -> None:
        """Write ``data`` to its stdin (started with ``stdin=True``); ``eof`` closes stdin afterwards."""
        await self._session._post("/commands/stdin", json={"id": self.id, "data": data, "eof": eof})

    async def kill(self) -> CommandInfo:
        """Stop it and everything it started (SIGTERM, then SIGKILL)."""
        resp = await self._session._post("/commands/kill", json={"id": self.id})
        return from_json(CommandInfo, resp.json())


class AsyncCommands:
    """``session.commands``: the session's commands."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def list(self) -> list[CommandInfo]:
        resp = wire.check(await self._session._http.get("/commands", headers=self._session._headers))
        return [from_json(CommandInfo, c) for c in resp.json()["commands"]]

    def connect(self, command_id: int) -> AsyncCommandHandle:
        """A handle on a command that runs (or ran) in the session, e.g. a shell tool's ``shell_id``."""
        return AsyncCommandHandle(self._session, command_id)


class AsyncFiles:
    """``session.files``: the session's workspace (paths relative to it); transfers are streamed."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def read(self, path: str) -> bytes:
        return (await self._session._post("/download_file", json={"file_path": path})).content

    async def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return (await self.read(path)).decode(encoding)

    async def download(self, path: str, dest: str | Path) -> Path:
        """Stream workspace file ``path`` to local ``dest``."""
        return await self._session.download_file(path, dest)

    async def write(self, path: str, data: bytes | str | IO[bytes]) -> str:
        """Write ``data`` (a file object is streamed) to workspace ``path``; returns the path."""
        name, form = wire.upload_form(path)
        content = data.encode() if isinstance(data, str) else data
        resp = await self._session._post("/upload_file", files={"file": (name, content)}, data=form)
        return str(resp.json()["file_path"])

    async def upload(self, local: str | Path, path: str | None = None) -> str:
        """Stream local file ``local`` to workspace ``path`` (default: its name at the root)."""
        local = Path(local)
        fh = await asyncio.to_thread(local.open, "rb")
        try:  # httpx reads the file in chunks while sending
            return await self.write(path or local.name, fh)
        finally:
            fh.close()

    async def list(self, path: str = ".") -> list[FileInfo]:
        return wire.file_infos(await self._session._post("/files/list", json={"path": path}))

    async def exists(self, path: str) -> bool:
        return bool((await self._session._post("/files/stat", json={"path": path})).json()["exists"])

    async def remove(self, path: str, recursive: bool = False) -> None:
        await self._session._post("/files/remove", json={"path": path, "recursive": recursive})


class AsyncSession:
    """One session (one node) of an :class:`AsyncToolServerClient`; ``session_id`` is its cookie.

    Used as an async context manager, it is released on exit.
    """

    def __init__(self, http: httpx.AsyncClient, session_id: str) -> None:
        self._http = http
        self.session_id = session_id
        self._headers = wire.cookie_headers(session_id)
        self.files = AsyncFiles(self)
        self.commands = AsyncCommands(self)

    @property
    def node_id(self) -> str:
        """The session id under XAgent's name for it."""
        return self.session_id

    async def _post(self, path: str, **kwargs: Any) -> httpx.Response:
        return wire.check(await self._http.post(path, headers=self._headers, **kwargs))

    # ---- commands and Python ----------------------------------------------------------------------

    async def run(
        self,
        command: str,
        *,
        on_stdout: Callback = None,
        on_stderr: Callback = None,
        background: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109 - the command's limit, killed after it
        stdin: bool = False,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
    ) -> Any:
        """Run ``command`` with bash in the workspace; see :meth:`toolserver.client.Session.run`."""
        body = wire.command_body(
            command, background=background, timeout=timeout, stdin=stdin, cwd=cwd, env=env
        )
        if background:
            resp = await self._post("/commands", json=body)
            return AsyncCommandHandle(self, resp.json()["id"], command)
        return await self._follow("/commands", body, on_stdout, on_stderr)

    async def _follow(
        self, path: str, body: dict[str, Any], on_stdout: Callback, on_stderr: Callback
    ) -> CommandResult:
        events = wire.CommandEvents()
        callbacks = {"stdout": on_stdout, "stderr": on_stderr}
        async with self._http.stream("POST", path, json=body, headers=self._headers) as resp:
            if resp.status_code >= 400:
                await resp.aread()
                wire.check(resp)
            try:
                async for line in resp.aiter_lines():
                    output = events.feed(line)
                    if output is not None and (callback := callbacks[output[0]]) is not None:
                        result = callback(output[1])
                        if inspect.isawaitable(result):
                            await result
            except httpx.TransportError as exc:  # cut while streaming (the node went away, say)
                raise wire.broken_stream(events, exc) from exc
        return events.result()

    async def python(self, code: str) -> PythonResult:
        """Run ``code`` in the session's notebook kernel (state kept between calls)."""
        try:
            answer = await self.execute_tool(wire.NOTEBOOK_TOOL, {"code": code})
        except ToolFailedError as exc:
            failed = wire.python_error(exc)
            if failed is None:
                raise
            return failed
        return wire.python_result(answer)

    # ---- XAgent's node API --------------------------------------------------------------------------

    async def execute_tool(
        self, tool_name: str, arguments: dict[str, Any] | None = None, env_name: str | None = None
    ) -> Any:
        payload = wire.tool_payload(tool_name, arguments, env_name)
        return (await self._post("/execute_tool", json=payload)).json()

    async def get_available_tools(self) -> dict[str, Any]:
        return (await self._post("/get_available_tools", json={})).json()

    async def retrieve_tools(self, question: str, top_k: int = 5) -> dict[str, Any]:
        return (await self._post("/retrieving_tools", json={"question": question, "top_k": top_k})).json()

    async def get_json_schema_for_tools(self, tool_names: list[str]) -> dict[str, Any]:
        return (await self._post("/get_json_schema_for_tools", json={"tool_names": tool_names})).json()

    async def get_workspace_structure(self) -> Any:
        return (await self._post("/get_workspace_structure")).json()

    async def upload_file(self, path: str | Path, filename: str | None = None) -> Any:
        path = Path(path)
        fh = await asyncio.to_thread(path.open, "rb")
        try:  # httpx reads the file in chunks while sending
            return (await self._post("/upload_file", files={"file": (filename or path.name, fh)})).json()
        finally:
            fh.close()

    async def download_file(self, file_path: str, dest: str | Path) -> Path:
        return await self._download("/download_file", {"file_path": file_path}, Path(dest))

    async def download_workspace(self, dest: str | Path) -> Path:
        return await self._download("/download_workspace", None, Path(dest))

    async def _download(self, path: str, payload: dict[str, Any] | None, dest: Path) -> Path:
        async with self._http.stream("POST", path, json=payload, headers=self._headers) as resp:
            if resp.status_code >= 400:
                await resp.aread()
                wire.check(resp)
            out = await asyncio.to_thread(dest.open, "wb")
            try:
                async for chunk in resp.aiter_bytes(1 << 20):
                    await asyncio.to_thread(out.write, chunk)
            finally:
                out.close()
        return dest

    def stream(
        self, path: str, json: Any = None, headers: dict[str, str] | None = None, method: str = "POST"
    ) -> contextlib.AbstractAsyncContextManager[httpx.Response]:
        """Send ``json`` to the session's ``path``; the answer comes unread and unchecked.

        For callers that read the body as it arrives or want every status as it is (the MCP
        bridge). ``headers`` are added to the session's own.
        """
        return self._http.stream(method, path, json=json, headers={**self._headers, **(headers or {})})

    # ---- lifecycle ----------------------------------------------------------------------------------

    async def reconnect(self) -> None:
        await self._post("/reconnect_session")

    async def pause(self) -> SessionState:
        """Freeze the node with its memory; see :meth:`toolserver.client.Session.pause`."""
        return wire.session_state(await self._post("/pause_session"))

    async def resume(self) -> SessionState:
        return wire.session_state(await self._post("/resume_session"))

    async def extend(self, timeout: float) -> SessionState:  # noqa: ASYNC109 - the session's lifetime
        return wire.session_state(await self._post("/extend_session", json={"timeout_seconds": timeout}))

    async def fork(
        self,
        *,
        labels: dict[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the new session's lifetime
    ) -> AsyncSession:
        """A new session from a copy of this one's workspace; see :meth:`toolserver.client.Session.fork`."""
        resp = await self._post("/fork_session", json=wire.fork_body(labels, timeout))
        return AsyncSession(self._http, wire.new_session_id(resp))

    async def close(self) -> None:
        await self._post("/close_session")

    async def release(self) -> None:
        await self._post("/release_session")

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(ClientError, httpx.HTTPError):
            await self.release()


class AsyncToolServerClient:
    """Asynchronous client of a ToolServer manager."""

    def __init__(
        self,
        base_url: str = wire.DEFAULT_URL,
        timeout: float | httpx.Timeout = wire.DEFAULT_TIMEOUT,
        api_key: str | None = None,
    ) -> None:
        self.base_url = base_url
        self.api_key = api_key
        headers = wire.auth_headers(api_key)
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout, trust_env=False, headers=headers)

    async def alive(self) -> bool:
        return (await self._http.get("/alive")).status_code == 200

    async def create_session(
        self,
        *,
        labels: dict[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the session's lifetime, not this call's
        **options: Any,
    ) -> AsyncSession:
        """Start a session; see :meth:`toolserver.client.ToolServerClient.create_session`."""
        body = wire.session_options(labels, timeout, options)
        return AsyncSession(self._http, wire.new_session_id(await self._http.post("/get_cookie", json=body)))

    def connect(self, session_id: str) -> AsyncSession:
        """A handle on an existing session (no request is made: a wrong id fails on first use)."""
        return AsyncSession(self._http, session_id)

    async def list_sessions(self, labels: dict[str, str] | None = None) -> list[SessionInfo]:
        """Your sessions, those carrying every one of ``labels`` when given."""
        return wire.sessions_from(await self._http.get("/sessions", params=wire.label_params(labels)))

    async def get_cookie(self, labels: dict[str, str] | None = None) -> AsyncSession:
        return await self.create_session(labels=labels)

    def attach(self, node_id: str) -> AsyncSession:
        return self.connect(node_id)

    @contextlib.asynccontextmanager
    async def session(self, **options: Any) -> AsyncIterator[AsyncSession]:
        """A session released on exit; ``options`` as for :meth:`create_session`."""
        async with await self.create_session(**options) as session:
            yield session

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncToolServerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
