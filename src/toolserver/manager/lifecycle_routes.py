"""The session routes of a session's lifetime: extend, pause, resume, fork.

Each acts on the session of the ``node_id`` cookie (its owner's key, or an admin key) and answers
with a :class:`SessionAnswer`; the X-Session-Expires header carries the expiry too. A tier without
the capability (``pause``, ``fork``) answers 409 naming it.
"""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import Cookie, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

from toolserver.errors import InvalidRequest
from toolserver.manager import admin
from toolserver.manager.auth import Caller
from toolserver.manager.models import ToolServerNode
from toolserver.manager.options import expires_text
from toolserver.protocol import COOKIE_NAME, EXPIRES_HEADER, ExtendRequest, SessionOptions

M = TypeVar("M", bound=BaseModel)

LIFECYCLE_PATHS = ("/extend_session", "/pause_session", "/resume_session", "/fork_session")

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": admin.Detail, "description": "no API key, or an unknown, revoked or expired one"},
    403: {"description": "invalid node_id (a JSON string), or the session belongs to another key"},
    409: {
        "model": admin.Detail,
        "description": "the node is in no state for this (pausing a stopped node), or its tier lacks "
        "the capability (names it)",
    },
    422: {"model": admin.Detail, "description": "a bad body; names the key"},
    503: {"model": admin.Detail, "description": "database or runtime unavailable, or the node failed"},
}


class SessionAnswer(BaseModel):
    session_id: str = Field(description="the session's short id")
    status: str = Field(description="the node's status: running, paused, exited, ...")
    expires_at: str | None = Field(description="when the session is released (ISO 8601 UTC), null: never")


class ForkAnswer(SessionAnswer):
    memory_forked: bool = Field(False, description="always false: the fork starts fresh processes")
    message: str = Field(description="what the fork copied")
    source: str = Field(description="the source session's short id")


def optional_body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI of an optional JSON body that a route reads itself (after its ownership check)."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": False, "content": {"application/json": {"schema": schema}}}}


def required_body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI of a required JSON body that a route reads itself (after its ownership check)."""
    extra = optional_body(model)
    extra["requestBody"]["required"] = True
    return extra


def parse_body(model: type[M], body: bytes) -> M | None:
    """``body`` as ``model`` (None when empty); InvalidRequest (422) naming the bad key."""
    if not body.strip():
        return None
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise InvalidRequest("invalid request: " + describe_errors(exc.errors())) from None


def describe_errors(errors: Any) -> str:
    """Validation errors as one line naming each bad key (values are not echoed)."""
    parts = []
    for err in errors:
        where = ".".join(str(p) for p in err.get("loc", ())) or "body"
        if err.get("type") == "extra_forbidden":
            parts.append(f"unknown key '{where}'")
        else:
            parts.append(f"'{where}': {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def expiry_header(node: ToolServerNode) -> dict[str, str]:
    """The X-Session-Expires header of a session's answer (none when it never expires)."""
    expires = expires_text(node.expires_at)
    return {EXPIRES_HEADER: expires} if expires else {}


def _answer(node: ToolServerNode, model: type[SessionAnswer] = SessionAnswer, **extra: Any) -> JSONResponse:
    body = model(
        session_id=node.short_id, status=node.status, expires_at=expires_text(node.expires_at), **extra
    )
    return JSONResponse(body.model_dump(), headers=expiry_header(node))


def add_lifecycle_routes(app: FastAPI, caller_dep: Any) -> None:
    """Mount the routes on the manager's app (``caller_dep``: the authenticated caller)."""

    def sessions_of(request: Request) -> Any:
        return request.app.state.sessions

    @app.post(
        "/extend_session",
        responses=ERRORS,
        tags=["sessions"],
        response_model=SessionAnswer,
        openapi_extra=required_body(ExtendRequest),
    )
    async def extend_session(
        request: Request, caller: Caller = caller_dep, node_id: str | None = Cookie(None)
    ) -> JSONResponse:
        """Move the session's expiry to ``timeout_seconds`` from now (at most the maximum)."""
        sessions = sessions_of(request)
        await sessions.session(node_id, caller)  # whose session it is comes before what the body says
        body = parse_body(ExtendRequest, await request.body())
        if body is None:
            raise InvalidRequest("invalid request: 'timeout_seconds': Field required")
        node = await sessions.extend(node_id, body.timeout_seconds, caller)
        return _answer(node)

    @app.post("/pause_session", responses=ERRORS, tags=["sessions"], response_model=SessionAnswer)
    async def pause_session(
        request: Request, caller: Caller = caller_dep, node_id: str | None = Cookie(None)
    ) -> JSONResponse:
        """Freeze the session's node with its memory; the next request (or resume_session) thaws it."""
        return _answer(await sessions_of(request).sleep.pause(node_id, caller))

    @app.post("/resume_session", responses=ERRORS, tags=["sessions"], response_model=SessionAnswer)
    async def resume_session(
        request: Request, caller: Caller = caller_dep, node_id: str | None = Cookie(None)
    ) -> JSONResponse:
        """Thaw the session's paused node: its processes and memory are as they were."""
        return _answer(await sessions_of(request).sleep.resume(node_id, caller))

    @app.post(
        "/fork_session",
        responses=ERRORS,
        tags=["sessions"],
        response_model=ForkAnswer,
        # /get_cookie's body model, in the components already (its schema has $defs of its own)
        openapi_extra={
            "requestBody": {
                "required": False,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SessionOptions"}}},
            }
        },
    )
    async def fork_session(
        request: Request, caller: Caller = caller_dep, node_id: str | None = Cookie(None)
    ) -> JSONResponse:
        """A new session (its own cookie, secret and node) starting from a copy of this one's
        workspace (Docker: also its container's filesystem changes); the source runs on untouched.
        Memory is not forked: the new node's processes start fresh. The body may give the new
        session's ``labels`` and ``timeout_seconds``/``idle_seconds``. The answer sets the new
        session's cookie."""
        sessions = sessions_of(request)
        await sessions.session(node_id, caller)  # whose session it is comes before what the body says
        options = parse_body(SessionOptions, await request.body())
        source, node = await sessions.forks.fork(node_id, caller, options)
        response = _answer(
            node,
            ForkAnswer,
            source=source.short_id,
            message=f"forked: {sessions.forks.what_is_copied()}; memory is not forked (fresh processes)",
        )
        response.set_cookie(COOKIE_NAME, node.id, httponly=True, samesite="lax")
        await sessions.hand_over(node)
        return response


__all__ = ["LIFECYCLE_PATHS", "ForkAnswer", "SessionAnswer", "add_lifecycle_routes", "expiry_header"]
