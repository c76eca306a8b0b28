"""Python SDK for a ToolServer manager: ``ToolServerClient`` (sync) and ``AsyncToolServerClient``.

::

    with ToolServerClient("http://127.0.0.1:8080") as client, client.session() as s:
        s.execute_tool("calculator", {"expression": "6*7"})

Every session holds its own ``node_id`` cookie, so one client can drive many sessions. Error
answers raise :class:`toolserver.errors.ClientError` with the status code and the server's detail.
Uploads and downloads are streamed from and to disk.

A manager with ``auth: api_keys`` needs a key: ``ToolServerClient(url, api_key="tsk_…")``, or
``$TOOLSERVER_API_KEY``, or credentials in the URL (``http://key:tsk_…@host:8080``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from toolserver.errors import ClientError
from toolserver.protocol import COOKIE_NAME

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)
#: Environment variable holding the API key when none is given.
API_KEY_ENV = "TOOLSERVER_API_KEY"


def _auth_headers(api_key: str | None) -> dict[str, str]:
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    return {"Authorization": f"Bearer {key}"} if key else {}


@dataclass(frozen=True)
class BinaryOutput:
    """A ``{"type": "binary"}`` tool result, decoded."""

    media_type: str
    name: str
    data: bytes


def unwrap(obj: Any) -> Any:
    """Turn a wrapped tool result into Python values (binary data decoded to bytes)."""
    if isinstance(obj, dict) and obj.get("type") in ("simple", "binary", "composite") and "data" in obj:
        if obj["type"] == "simple":
            return obj["data"]
        if obj["type"] == "binary":
            return BinaryOutput(
                obj.get("media_type", "application/octet-stream"),
                obj.get("name", ""),
                base64.b64decode(obj["data"]),
            )
        return [unwrap(o) for o in obj["data"]]
    return obj


def _detail(resp: httpx.Response) -> Any:
    try:
        body = resp.json()
    except ValueError:
        return resp.text
    return body.get("detail", body) if isinstance(body, dict) else body


def _check(resp: httpx.Response) -> httpx.Response:
    if resp.status_code >= 400:
        detail = _detail(resp)
        raise ClientError(
            f"{resp.request.method} {resp.request.url.path}: {resp.status_code} {detail}",
            status_code=resp.status_code,
            body=detail,
        )
    return resp


def _cookie(resp: httpx.Response) -> str:
    node_id = resp.cookies.get(COOKIE_NAME)
    if not node_id:
        raise ClientError("the manager answered /get_cookie without a node_id cookie", resp.status_code)
    return node_id


def _tool_payload(tool_name: str, arguments: dict[str, Any] | None, env_name: str | None) -> dict[str, Any]:
    payload: dict[str, Any] = {"tool_name": tool_name, "arguments": arguments or {}}
    if env_name:
        payload["env_name"] = env_name
    return payload


class Session:
    """One session (one node) of a :class:`ToolServerClient`."""

    def __init__(self, http: httpx.Client, node_id: str) -> None:
        self._http = http
        self.node_id = node_id
        self._headers = {"Cookie": f"{COOKIE_NAME}={node_id}"}

    def _post(self, path: str, **kwargs: Any) -> httpx.Response:
        return _check(self._http.post(path, headers=self._headers, **kwargs))

    def execute_tool(
        self, tool_name: str, arguments: dict[str, Any] | None = None, env_name: str | None = None
    ) -> Any:
        """Run a tool; returns its (wrapped) JSON result. See :func:`unwrap`."""
        return self._post("/execute_tool", json=_tool_payload(tool_name, arguments, env_name)).json()

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
                _check(resp)
            with dest.open("wb") as out:
                for chunk in resp.iter_bytes(1 << 20):
                    out.write(chunk)
        return dest

    def reconnect(self) -> None:
        """Restart the node (workspace kept) and wait until it serves."""
        self._post("/reconnect_session")

    def close(self) -> None:
        """Stop the node; ``reconnect`` starts it again."""
        self._post("/close_session")

    def release(self) -> None:
        """Kill and remove the node for good."""
        self._post("/release_session")


class ToolServerClient:
    """Synchronous client of a ToolServer manager."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        api_key: str | None = None,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url, timeout=timeout, trust_env=False, headers=_auth_headers(api_key)
        )

    def alive(self) -> bool:
        return self._http.get("/alive").status_code == 200

    def get_cookie(self, labels: dict[str, str] | None = None) -> Session:
        """Start a new session (with ``labels``); the caller releases it (or use :meth:`session`)."""
        body = {"labels": labels} if labels else None
        return Session(self._http, _cookie(_check(self._http.post("/get_cookie", json=body))))

    def attach(self, node_id: str) -> Session:
        """A handle on an existing session."""
        return Session(self._http, node_id)

    @contextlib.contextmanager
    def session(self, labels: dict[str, str] | None = None) -> Iterator[Session]:
        """A session released on exit."""
        session = self.get_cookie(labels)
        try:
            yield session
        finally:
            with contextlib.suppress(ClientError, httpx.HTTPError):
                session.release()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ToolServerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncSession:
    """One session (one node) of an :class:`AsyncToolServerClient`."""

    def __init__(self, http: httpx.AsyncClient, node_id: str) -> None:
        self._http = http
        self.node_id = node_id
        self._headers = {"Cookie": f"{COOKIE_NAME}={node_id}"}

    async def _post(self, path: str, **kwargs: Any) -> httpx.Response:
        return _check(await self._http.post(path, headers=self._headers, **kwargs))

    async def execute_tool(
        self, tool_name: str, arguments: dict[str, Any] | None = None, env_name: str | None = None
    ) -> Any:
        return (await self._post("/execute_tool", json=_tool_payload(tool_name, arguments, env_name))).json()

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
                _check(resp)
            out = await asyncio.to_thread(dest.open, "wb")
            try:
                async for chunk in resp.aiter_bytes(1 << 20):
                    await asyncio.to_thread(out.write, chunk)
            finally:
                out.close()
        return dest

    def stream(
        self, path: str, json: Any = None, headers: dict[str, str] | None = None
    ) -> contextlib.AbstractAsyncContextManager[httpx.Response]:
        """POST ``json`` to the session's ``path``; the answer comes unread and unchecked.

        For callers that read the body as it arrives or want every status as it is (the MCP
        bridge). ``headers`` are added to the session's own.
        """
        return self._http.stream("POST", path, json=json, headers={**self._headers, **(headers or {})})

    async def reconnect(self) -> None:
        await self._post("/reconnect_session")

    async def close(self) -> None:
        await self._post("/close_session")

    async def release(self) -> None:
        await self._post("/release_session")


class AsyncToolServerClient:
    """Asynchronous client of a ToolServer manager."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        api_key: str | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url, timeout=timeout, trust_env=False, headers=_auth_headers(api_key)
        )

    async def alive(self) -> bool:
        return (await self._http.get("/alive")).status_code == 200

    async def get_cookie(self, labels: dict[str, str] | None = None) -> AsyncSession:
        body = {"labels": labels} if labels else None
        return AsyncSession(self._http, _cookie(_check(await self._http.post("/get_cookie", json=body))))

    def attach(self, node_id: str) -> AsyncSession:
        return AsyncSession(self._http, node_id)

    @contextlib.asynccontextmanager
    async def session(self, labels: dict[str, str] | None = None) -> AsyncIterator[AsyncSession]:
        session = await self.get_cookie(labels)
        try:
            yield session
        finally:
            with contextlib.suppress(ClientError, httpx.HTTPError):
                await session.release()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncToolServerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


__all__ = [
    "AsyncSession",
    "AsyncToolServerClient",
    "BinaryOutput",
    "ClientError",
    "Session",
    "ToolServerClient",
    "unwrap",
]
