"""Database records: ToolServerNode and NodeChecker, with the seed's fields, names and defaults,
plus ApiKey (who may use the manager) and SessionEvent (what happened to a session).

Times are naive UTC (portable between SQLite and PostgreSQL).

Every node record says who owns it (:class:`Ownership`), so that a checker can tell, from the
record alone, a create in flight from a node nobody holds::

    insert ──▶ starting ──(cookie handed over)──▶ session ──(release cut short)──▶ releasing
                  │  ▲                                                               │
     (pool node ready)  (claimed by /get_cookie)                       (checker finishes it)
                  ▼  │
                 pool

A ``starting`` record belongs to the manager process named in ``creator`` until ``deadline``;
past it, or once that process is gone, the checker removes the record and whatever the runtime
made for it.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, Index, Integer, String, Text, false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from toolserver.states import STOPPED_STATUSES, NodeHealth, NodeStatus

#: Record status before the runtime reports one (the seed's default).
STATUS_CREATED = NodeStatus.NEW


class Ownership(StrEnum):
    """Who a node belongs to (the ``ownership`` column)."""

    #: A manager process (``creator``) is creating it or handing it over, until ``deadline``.
    STARTING = "starting"
    #: A ready warm-pool node that no session holds yet.
    POOL = "pool"
    #: Its cookie has been handed to a client.
    SESSION = "session"
    #: Its session let go, but the runtime could not remove everything yet; the checker retries.
    RELEASING = "releasing"


class Asleep(StrEnum):
    """How the checker put an idle node to sleep (the ``asleep`` column); a request wakes it."""

    #: Frozen with its memory (node.idle_action: pause): the request resumes it.
    PAUSED = "paused"
    #: Stopped (node.idle_action: stop): the request restarts it, workspace kept.
    STOPPED = "stopped"


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def new_token() -> str:
    """A session cookie or node secret: 256 random bits, URL-safe, never beginning with "-" (one
    cookie in 64 did, and ``toolserver exec --session <it>`` took it for an option)."""
    while (token := secrets.token_urlsafe(32)).startswith("-"):
        pass
    return token


class Base(DeclarativeBase):
    pass


class ToolServerNode(Base):
    """One session's node. ``id`` is the session cookie: a random token, never a runtime id."""

    __tablename__ = "toolserver_nodes"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    short_id: Mapped[str] = mapped_column(String(32), unique=True, index=True)
    manager_id: Mapped[str] = mapped_column(String(255), index=True)
    status: Mapped[str] = mapped_column(String(32), default=NodeStatus.NEW)
    health: Mapped[str] = mapped_column(String(32), default=NodeHealth.UNKNOWN)
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
    #: The warm pool's node (started for it or ready in it); a claim clears it.
    pooled: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false(), index=True)
    #: See :class:`Ownership`; ``creator`` and ``deadline`` are set while ``starting``.
    ownership: Mapped[str] = mapped_column(
        String(16), default=Ownership.STARTING, server_default=Ownership.SESSION.value, index=True
    )
    creator: Mapped[str | None] = mapped_column(String(255), nullable=True, default=None)
    deadline: Mapped[datetime | None] = mapped_column(DateTime, nullable=True, default=None)
    #: The id of the API key that opened the session; None with ``auth: none`` and for pool nodes.
    owner: Mapped[str | None] = mapped_column(String(32), nullable=True, default=None, index=True)
    #: The session's labels (``/get_cookie`` body), string to string.
    labels: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True, default=dict)
    #: Absolute end of the session (``timeout_seconds``); the checker releases it then. None: never.
    expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True, default=None, index=True)
    #: The session's own idle limit (``idle_seconds``); None: node.idling_close_minutes.
    idle_seconds: Mapped[float | None] = mapped_column(Float, nullable=True, default=None)
    #: Set while the checker has put the node to sleep for idleness (:class:`Asleep`): the next
    #: request wakes it.
    asleep: Mapped[str | None] = mapped_column(String(16), nullable=True, default=None)
    #: What the node was made with beyond the defaults (``env``, ``resources``, ``network``), so a
    #: fork gets the same.
    node_options: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True, default=None)
    #: The manager id the runtime's mark on the node carries (the manager that created it); differs
    #: from ``manager_id`` once another replica adopted the node. None: the same as ``manager_id``.
    origin: Mapped[str | None] = mapped_column(String(255), nullable=True, default=None, index=True)

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
            "status": NodeStatus.NEW,
            "health": NodeHealth.UNKNOWN,
            "runtime": runtime,
            "runtime_state": {},
            "secret": new_token(),
            "last_req_time": now,
            "created_at": now,
            "status_changed_at": now,
            "pooled": False,
            "ownership": Ownership.STARTING,
            "creator": None,
            "deadline": None,
            "owner": None,
            "labels": {},
            "expires_at": None,
            "idle_seconds": None,
            "asleep": None,
            "node_options": None,
            "origin": manager_id,
        }
        return cls(**(values | fields))

    def __repr__(self) -> str:  # never print the token
        return (
            f"<ToolServerNode {self.short_id} {self.ownership} {self.status}/{self.health} "
            f"{self.ip}:{self.port}>"
        )


class NodeChecker(Base):
    """The checker loop of one manager. While this record exists the loop runs."""

    __tablename__ = "node_checkers"

    manager_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True, default=None)
    interval: Mapped[float] = mapped_column(Float, default=1.0)
    host: Mapped[str] = mapped_column(String(255), default="")
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class ManagerLease(Base):
    """A manager replica's lease: alive while ``deadline`` (renewed by its checker) lies ahead.

    Once it has passed, one live replica adopts the manager's nodes and sets ``adopted_by``; the
    manager clears it when it renews its lease again (its new nodes are its own), and does not take
    back what was adopted.
    """

    __tablename__ = "manager_leases"

    manager_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    #: the process renewing it (``host/pid/start time``)
    holder: Mapped[str] = mapped_column(String(255), default="")
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    deadline: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    adopted_by: Mapped[str | None] = mapped_column(String(255), nullable=True, default=None)
    adopted_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True, default=None)

    def __repr__(self) -> str:
        return f"<ManagerLease {self.manager_id} until {self.deadline} adopted_by={self.adopted_by}>"


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


__all__ = [
    "START_EVENTS",
    "STATUS_CREATED",
    "STOPPED_STATUSES",
    "ApiKey",
    "Asleep",
    "Base",
    "ManagerLease",
    "NodeChecker",
    "Ownership",
    "SessionEvent",
    "ToolServerNode",
    "new_token",
    "utcnow",
]
