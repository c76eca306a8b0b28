"""The admin API (``/admin/...``, an admin key) and ``/metrics``; see the README for the routes.

Sessions are named by their short id here, never by their cookie. With ``auth: none`` every
caller counts as an admin (anyone who reaches a loopback port could do all of this anyway).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from toolserver.errors import AdminRequired
from toolserver.manager.auth import Caller, KeyRing, current_caller, describe
from toolserver.manager.events import event_json
from toolserver.manager.listing import redacted
from toolserver.manager.metrics import CONTENT_TYPE_LATEST
from toolserver.manager.models import ToolServerNode, utcnow
from toolserver.manager.sessions import SessionService


def require_admin(caller: Annotated[Caller, Depends(current_caller)]) -> Caller:
    """FastAPI dependency: the caller, who must hold an admin key (AdminRequired otherwise)."""
    if not caller.is_admin:
        raise AdminRequired(f"this route needs an admin key; key {caller.name!r} has scope {caller.scope!r}")
    return caller


Admin = Annotated[Caller, Depends(require_admin)]


class Detail(BaseModel):
    detail: str


class SessionInfo(BaseModel):
    short_id: str
    owner: str | None = Field(description="id of the API key that opened the session")
    owner_name: str | None
    status: str
    health: str
    labels: dict[str, str]
    pooled: bool
    created_at: str
    age_seconds: int
    idle_seconds: int
    detail: str | None
    manager_id: str = Field(description="the replica that keeps the record true (its checker)")


class Event(BaseModel):
    at: str
    kind: str
    detail: str | None


class SessionDetail(SessionInfo):
    events: list[Event]


class PoolState(BaseModel):
    target: int = Field(description="node.warm_pool_size")
    ready: int
    starting: int
    misses: int = Field(description="new sessions that found the pool empty (this process)")


class DrainState(BaseModel):
    draining: bool
    live_sessions: int


class KeyInfo(BaseModel):
    id: str
    name: str
    scope: str
    state: str
    created_at: str
    expires_at: str | None
    revoked_at: str | None
    max_sessions: int | None
    starts_per_minute: int | None


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Detail, "description": "no API key, or an unknown, revoked or expired one"},
    403: {"model": Detail, "description": "the key is not an admin key"},
    503: {"model": Detail, "description": "the database is unavailable (Retry-After)"},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": Detail, "description": "no such session"}}


def _sessions(request: Request) -> SessionService:
    return request.app.state.sessions  # type: ignore[no-any-return]


def _keyring(request: Request) -> KeyRing | None:
    return request.app.state.keyring  # type: ignore[no-any-return]


async def session_infos(request: Request, nodes: list[ToolServerNode]) -> list[dict[str, Any]]:
    keyring = _keyring(request)
    names = await keyring.names(n.owner for n in nodes) if keyring else {}
    now = utcnow()
    out = []
    for node in nodes:
        row = redacted(node, now)
        out.append(
            {
                **{k: row[k] for k in ("short_id", "status", "health", "pooled", "created_at", "detail")},
                "age_seconds": row["age_seconds"],
                "idle_seconds": row["idle_seconds"],
                "owner": node.owner,
                "owner_name": names.get(node.owner) if node.owner else None,
                "labels": node.labels or {},
                "manager_id": node.manager_id,
            }
        )
    return out


def _matches_label(labels: dict[str, str], wanted: str) -> bool:
    name, sep, value = wanted.partition("=")
    return name in labels and (not sep or labels[name] == value)


router = APIRouter(responses=ERRORS)


@router.get("/admin/sessions", response_model=list[SessionInfo], tags=["admin"])
async def list_sessions(
    request: Request,
    _: Admin,
    status: Annotated[str | None, Query(max_length=32, description="e.g. running, exited")] = None,
    owner: Annotated[str | None, Query(max_length=128, description="key id or name")] = None,
    label: Annotated[
        str | None, Query(max_length=400, description="name=value, or name to match any value")
    ] = None,
    min_age_seconds: Annotated[float | None, Query(ge=0, le=1e9)] = None,
    max_age_seconds: Annotated[float | None, Query(ge=0, le=1e9)] = None,
    pooled: Annotated[bool, Query(description="include warm-pool nodes")] = False,
    manager: Annotated[str | None, Query(max_length=255, description="only this replica's records")] = None,
) -> list[dict[str, Any]]:
    """The sessions of every manager sharing the database (any replica answers alike), oldest
    first, filtered by status, owner, label, age and the replica that keeps them."""
    sessions = _sessions(request)
    nodes = await sessions.store.list_nodes(manager)
    now = utcnow()
    if owner is not None:
        keyring = _keyring(request)
        names = await keyring.names(n.owner for n in nodes) if keyring else {}
        owner_ids = {owner} | {k for k, name in names.items() if name == owner}
    picked = [
        n
        for n in sorted(nodes, key=lambda n: n.created_at)
        if (pooled or not n.pooled)
        and (status is None or n.status == status)
        and (owner is None or n.owner in owner_ids)
        and (label is None or _matches_label(n.labels or {}, label))
        and (min_age_seconds is None or now - n.created_at >= timedelta(seconds=min_age_seconds))
        and (max_age_seconds is None or now - n.created_at <= timedelta(seconds=max_age_seconds))
    ]
    return await session_infos(request, picked)


@router.get("/admin/sessions/{short_id}", response_model=SessionDetail, responses=NOT_FOUND, tags=["admin"])
async def get_session(request: Request, short_id: str, caller: Admin) -> dict[str, Any]:
    """One session's record and its recent events (oldest first)."""
    sessions = _sessions(request)
    node = await sessions.by_short_id(short_id, caller)
    [info] = await session_infos(request, [node])
    events = await sessions.store.recent_events(node.short_id)
    return {**info, "events": [event_json(e) for e in events]}


@router.post(
    "/admin/sessions/{short_id}/{action}", response_model=Detail, responses=NOT_FOUND, tags=["admin"]
)
async def act_on_session(
    request: Request, short_id: str, action: Literal["stop", "release"], caller: Admin
) -> dict[str, str]:
    """``stop`` the session's node (its owner can reconnect it), or ``release`` it: kill and remove
    the node and delete its record."""
    sessions = _sessions(request)
    node = await sessions.by_short_id(short_id, caller)
    act = sessions.close_node if action == "stop" else sessions.release_node
    await act(node, f"by admin {caller.name}")
    return {"detail": f"{'stopped' if action == 'stop' else 'released'} session {node.short_id}"}


@router.get("/admin/pool", response_model=PoolState, tags=["admin"])
async def pool_state(request: Request, _: Admin) -> dict[str, int]:
    """The warm pool: its target size, ready and starting nodes, and misses."""
    sessions = _sessions(request)
    ready = starting = 0
    for _owner, status, pooled, n in await sessions.store.session_counts(sessions.manager_id):
        if pooled:
            if status == "running":
                ready += n
            else:
                starting += n
    target = sessions.settings.node.warm_pool_size
    return {"target": target, "ready": ready, "starting": starting, "misses": sessions.pool_misses}


async def _drain_state(sessions: SessionService) -> dict[str, Any]:
    live = sum(
        n
        for _o, status, pooled, n in await sessions.store.session_counts(sessions.manager_id)
        if not pooled and status not in ("exited", "dead")
    )
    return {"draining": sessions.draining, "live_sessions": live}


@router.get("/admin/drain", response_model=DrainState, tags=["admin"])
async def drain_state(request: Request, _: Admin) -> dict[str, Any]:
    """Whether this manager process takes new sessions."""
    return await _drain_state(_sessions(request))


@router.post("/admin/drain", response_model=DrainState, tags=["admin"])
async def drain(request: Request, _: Admin) -> dict[str, Any]:
    """Take no new sessions (503 on /get_cookie); existing sessions keep working. Per process."""
    sessions = _sessions(request)
    sessions.draining = True
    sessions.metrics.draining.set(1)
    return await _drain_state(sessions)


@router.delete("/admin/drain", response_model=DrainState, tags=["admin"])
async def undrain(request: Request, _: Admin) -> dict[str, Any]:
    """Take new sessions again."""
    sessions = _sessions(request)
    sessions.draining = False
    sessions.metrics.draining.set(0)
    return await _drain_state(sessions)


@router.get("/admin/keys", response_model=list[KeyInfo], tags=["admin"])
async def list_keys(request: Request, _: Admin) -> list[dict[str, Any]]:
    """The API keys (never their secrets); keys are made with `toolserver keys create`."""
    now = utcnow()
    return [describe(k, now) for k in await _sessions(request).store.list_keys()]


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}},
    tags=["admin"],
)
async def metrics(request: Request, _: Admin) -> Response:
    """Prometheus metrics of this manager process (record counts of the whole manager)."""
    return Response(await render_metrics(request.app), media_type=CONTENT_TYPE_LATEST)


async def render_metrics(app: Any) -> bytes:
    """The metrics of ``app``'s manager, with its record counts read now."""
    sessions: SessionService = app.state.sessions
    keyring: KeyRing | None = app.state.keyring
    counts = await sessions.store.session_counts(sessions.manager_id)
    names = await keyring.names(o for o, *_ in counts) if keyring else {}
    return sessions.metrics.render(counts, names, sessions.settings.node.warm_pool_size)
