"""Database records: ToolServerNode and NodeChecker, with the seed's fields, names and defaults,
plus ApiKey (who may use the manager) and SessionEvent (what happened to a session).

Times are naive UTC (portable between SQLite and PostgreSQL).
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, Index, Integer, String, Text, false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: Record status before the runtime reports one (the seed's default).
STATUS_CREATED = "Created"
#: Runtime statuses under which a node no longer serves.
STOPPED_STATUSES = frozenset({"exited", "dead"})


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def new_token() -> str:
    """A session cookie or node secret: 256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


class Base(DeclarativeBase):
    pass


class ToolServerNode(Base):
    """One session's node. ``id`` is the session cookie: a random token, never a runtime id."""

    __tablename__ = "toolserver_nodes"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    short_id: Mapped[str] = mapped_column(String(32), unique=True, index=True)
    manager_id: Mapped[str] = mapped_column(String(255), index=True)
    status: Mapped[str] = mapped_column(String(32), default=STATUS_CREATED)
    health: Mapped[str] = mapped_column(String(32), default="Unknown")
    last_req_time: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    ip: Mapped[str] = mapped_column(String(255), default="0.0.0.0")
    port: Mapped[int] = mapped_column(Integer, default=0)
    # ToolServer's own columns
    runtime: Mapped[str] = mapped_column(String(32), default="process")
    runtime_state: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    secret: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    status_changed_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    detail: Mapped[str | None] = mapped_column(Text, nullable=True, default=None)
    #: A warm-pool node: started and healthy, not yet handed to a session.
    pooled: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false(), index=True)
    #: The id of the API key that opened the session; None with ``auth: none`` and for pool nodes.
    owner: Mapped[str | None] = mapped_column(String(32), nullable=True, default=None, index=True)
    #: The session's labels (``/get_cookie`` body), string to string.
    labels: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True, default=dict)

    @classmethod
    def new(
        cls, manager_id: str, runtime: str, *, at: datetime | None = None, **fields: Any
    ) -> ToolServerNode:
        """A record for a node about to be created: fresh cookie, short id and secret; times ``at``."""
        now = at or utcnow()
        values: dict[str, Any] = {
            "id": new_token(),
            "short_id": secrets.token_hex(6),
            "manager_id": manager_id,
            "status": STATUS_CREATED,
            "health": "Unknown",
            "runtime": runtime,
            "runtime_state": {},
            "secret": new_token(),
            "last_req_time": now,
            "created_at": now,
            "status_changed_at": now,
            "pooled": False,
            "owner": None,
            "labels": {},
        }
        return cls(**(values | fields))

    def __repr__(self) -> str:  # never print the token
        return f"<ToolServerNode {self.short_id} {self.status}/{self.health} {self.ip}:{self.port}>"


class NodeChecker(Base):
    """The checker loop of one manager. While this record exists the loop runs."""

    __tablename__ = "node_checkers"

    manager_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True, default=None)
    interval: Mapped[float] = mapped_column(Float, default=1.0)
    host: Mapped[str] = mapped_column(String(255), default="")
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class ApiKey(Base):
    """An API key. ``id`` is the key's visible prefix; only a SHA-256 of the whole key is stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), index=True)
    scope: Mapped[str] = mapped_column(String(16), default="user")
    secret_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True, default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True, default=None)
    #: Quotas; None takes the manager's ``quotas`` default, 0 means no limit.
    max_sessions: Mapped[int | None] = mapped_column(Integer, nullable=True, default=None)
    starts_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True, default=None)

    def __repr__(self) -> str:
        return f"<ApiKey {self.id} {self.name!r} {self.scope}>"


class SessionEvent(Base):
    """One thing that happened to a session: created, claimed, reconnected, closed, released, died, ...

    New-session events (:data:`START_EVENTS`) of a key are what ``starts_per_minute`` counts.
    """

    __tablename__ = "session_events"
    __table_args__ = (Index("ix_session_events_owner_at", "owner", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    short_id: Mapped[str] = mapped_column(String(32), index=True)
    owner: Mapped[str | None] = mapped_column(String(32), nullable=True, default=None)
    kind: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str | None] = mapped_column(Text, nullable=True, default=None)


#: Events that start a new session (counted by the ``starts_per_minute`` quota).
START_EVENTS = ("created", "claimed")
