"""Async access to the records (SQLAlchemy 2). SQLite through aiosqlite by default; any async URL works."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import Select, bindparam, delete, event, func, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from toolserver.errors import DatabaseUnavailable
from toolserver.manager.models import (
    START_EVENTS,
    ApiKey,
    NodeChecker,
    Ownership,
    SessionEvent,
    ToolServerNode,
    utcnow,
)
from toolserver.states import STOPPED_STATUSES, NodeStatus

log = logging.getLogger(__name__)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _alembic_upgrade(connection: Any) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).resolve().parent.parent / "migrations"))
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "head")


def _is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` means the database cannot be used right now (as opposed to a bad statement).

    Lost or refused connections surface as OSError, as SQLAlchemy's DBAPIError family (other than
    the errors a statement itself causes: integrity, programming, data), or, while connecting, as
    the driver's own exceptions (asyncpg's "the database system is starting up"), unwrapped.
    """
    if isinstance(exc, IntegrityError | ProgrammingError | DataError):
        return False
    if isinstance(exc, DBAPIError | OSError | TimeoutError):
        return True
    return type(exc).__module__.split(".")[0] == "asyncpg"


def _live_count(manager_id: str) -> Select[tuple[int]]:
    """How many nodes of ``manager_id`` are not stopped (what node.max_nodes limits)."""
    return (
        select(func.count())
        .select_from(ToolServerNode)
        .where(ToolServerNode.manager_id == manager_id, ToolServerNode.status.not_in(STOPPED_STATUSES))
    )


def _cluster_live_count() -> Select[tuple[int]]:
    """How many nodes of every manager sharing the database are not stopped (``cluster.max_nodes``)."""
    return (
        select(func.count()).select_from(ToolServerNode).where(ToolServerNode.status.not_in(STOPPED_STATUSES))
    )


def _owned_live_count(owner: str) -> Select[tuple[int]]:
    """How many sessions of API key ``owner`` are not stopped, in every manager (``max_sessions``)."""
    return (
        select(func.count())
        .select_from(ToolServerNode)
        .where(ToolServerNode.owner == owner, ToolServerNode.status.not_in(STOPPED_STATUSES))
    )


#: The window of the ``starts_per_minute`` quota.
START_WINDOW = timedelta(minutes=1)


@dataclass(frozen=True)
class KeyQuota:
    """The quotas that hold for one API key; None means no limit."""

    key_id: str
    max_sessions: int | None
    starts_per_minute: int | None


@dataclass(frozen=True)
class Admission:
    """What a new session's check saw, taken under the lock of its insert or claim."""

    admitted: bool
    live: int = 0  # live nodes of the manager (node.max_nodes)
    owned: int = 0  # live sessions of the key (max_sessions)
    starts: int = 0  # sessions the key started within START_WINDOW (starts_per_minute)
    oldest_start: datetime | None = None  # the first of those starts
    refused_by: str | None = None  # "max_nodes", "cluster_max_nodes", "max_sessions" or "starts_per_minute"
    cluster: int = 0  # live nodes of every manager (cluster.max_nodes), when that limit is set


_NODES = ToolServerNode.__table__
#: The advisory lock a migration holds (PostgreSQL).
MIGRATION_LOCK = "toolserver.migrate"
#: The advisory lock every admission takes first while ``cluster.max_nodes`` is set.
CLUSTER_LOCK = "cluster:max_nodes"


def this_process() -> str:
    """This manager process as a record's ``creator``: ``host/pid/start time``."""
    return f"{socket.gethostname()}/{os.getpid()}/{psutil.Process().create_time():.2f}"


def creator_alive(creator: str | None) -> bool | None:
    """Whether the manager process named ``creator`` (see :func:`this_process`) still runs.

    None when that cannot be told from here: another host's process (its record's deadline
    decides), or a name that does not parse.
    """
    host, _, rest = (creator or "").partition("/")
    pid, _, started = rest.partition("/")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        proc = psutil.Process(int(pid))
        same = abs(proc.create_time() - float(started)) < 0.05
        return same and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except (psutil.Error, ValueError):
        return None


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Store:
    """Records of nodes and checkers. Every method is one short transaction."""

    def __init__(self, url: str) -> None:
        self.url = make_url(url)
        if self.url.get_backend_name() == "sqlite" and self.url.database not in (None, "", ":memory:"):
            Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
        # a server database may restart under us: check a pooled connection before handing it out
        server = self.url.get_backend_name() != "sqlite"
        self.engine: AsyncEngine = create_async_engine(self.url, pool_pre_ping=server)
        if self.url.get_backend_name() == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self.session = async_sessionmaker(self.engine, expire_on_commit=False)
        # SQLite takes one writer at a time: queue writers here rather than in its busy-wait backoff
        self._write_lock = asyncio.Lock() if self.url.get_backend_name() == "sqlite" else None

    @asynccontextmanager
    async def _reachable(self) -> AsyncIterator[None]:
        """Turn a lost or refused database connection into DatabaseUnavailable."""
        try:
            yield
        except Exception as exc:
            if not _is_outage(exc):
                raise
            reason = (str(getattr(exc, "orig", None) or exc).splitlines() or [""])[0] or type(exc).__name__
            raise DatabaseUnavailable(f"database unavailable: {reason}") from exc

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncSession]:
        """A session for reads."""
        async with self._reachable(), self.session() as s:
            yield s

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncSession]:
        """A write transaction (serialised within this process on SQLite)."""
        async with self._reachable(), self._write_lock or contextlib.nullcontext(), self.session.begin() as s:
            yield s

    async def migrate(self) -> None:
        """Apply Alembic migrations up to head. On PostgreSQL one manager at a time (an advisory lock
        for the transaction): replicas started together on a new database would otherwise all
        create the tables, and all but one fail."""
        async with self.engine.begin() as conn:
            if self.url.get_backend_name() == "postgresql":
                await conn.execute(select(func.pg_advisory_xact_lock(func.hashtext(MIGRATION_LOCK))))
            await conn.run_sync(_alembic_upgrade)

    async def ping(self) -> None:
        """One round trip to the database (DatabaseUnavailable when it does not answer)."""
        async with self._read() as s:
            await s.execute(text("SELECT 1"))

    async def aclose(self) -> None:
        await self.engine.dispose()

    # ---- nodes --------------------------------------------------------------------------------------

    async def add_node(self, node: ToolServerNode) -> None:
        async with self._write() as s:
            s.add(node)

    async def get_node(self, node_id: str) -> ToolServerNode | None:
        async with self._read() as s:
            return await s.get(ToolServerNode, node_id)

    async def list_nodes(self, manager_id: str | None) -> list[ToolServerNode]:
        """The records ``manager_id`` keeps; None: those of every manager sharing the database."""
        query = select(ToolServerNode)
        if manager_id is not None:
            query = query.where(ToolServerNode.manager_id == manager_id)
        async with self._read() as s:
            return list(await s.scalars(query))

    async def count_live_nodes(self, manager_id: str) -> int:
        async with self._read() as s:
            return int(await s.scalar(_live_count(manager_id)) or 0)

    async def count_cluster_live_nodes(self) -> int:
        """Live nodes of every manager sharing the database."""
        async with self._read() as s:
            return int(await s.scalar(_cluster_live_count()) or 0)

    async def existing_short_ids(self, short_ids: Iterable[str]) -> set[str]:
        """Which of ``short_ids`` have a record, whichever manager holds it."""
        wanted = sorted(set(short_ids))
        if not wanted:
            return set()
        async with self._read() as s:
            q = select(ToolServerNode.short_id).where(ToolServerNode.short_id.in_(wanted))
            return set((await s.scalars(q)).all())

    async def add_node_within(self, node: ToolServerNode, limit: int) -> int:
        """Insert ``node`` unless its manager already has ``limit`` live nodes; returns that count."""
        return (await self.admit_node(node, limit)).live

    async def _lock(self, s: AsyncSession, *names: str) -> None:
        """Serialise writers for the rest of the transaction: SQLite's write lock (``BEGIN
        IMMEDIATE``), or transaction-scoped advisory locks on ``names`` (in this order) on PostgreSQL."""
        backend = self.url.get_backend_name()
        if backend == "sqlite":
            await s.execute(text("BEGIN IMMEDIATE"))
        elif backend == "postgresql":
            for name in names:
                await s.execute(select(func.pg_advisory_xact_lock(func.hashtext(name))))

    async def _key_usage(self, s: AsyncSession, quota: KeyQuota) -> dict[str, Any]:
        owned = int(await s.scalar(_owned_live_count(quota.key_id)) or 0)
        since = utcnow() - START_WINDOW
        starts, oldest = (
            await s.execute(
                select(func.count(), func.min(SessionEvent.at)).where(
                    SessionEvent.owner == quota.key_id,
                    SessionEvent.kind.in_(START_EVENTS),
                    SessionEvent.at > since,
                )
            )
        ).one()
        refused = None
        if quota.max_sessions is not None and owned >= quota.max_sessions:
            refused = "max_sessions"
        elif quota.starts_per_minute is not None and starts >= quota.starts_per_minute:
            refused = "starts_per_minute"
        return {"owned": owned, "starts": int(starts or 0), "oldest_start": oldest, "refused_by": refused}

    async def admit_node(
        self,
        node: ToolServerNode,
        limit: int,
        quota: KeyQuota | None = None,
        cluster_limit: int | None = None,
    ) -> Admission:
        """Insert ``node`` (and its ``created`` event) unless its manager has ``limit`` live nodes,
        every manager together ``cluster_limit`` (when given), or ``quota``'s key is at one of its
        quotas.

        Atomic across the processes sharing the database: the counts and the insert run under the
        database's write lock on SQLite (``BEGIN IMMEDIATE``) and under transaction-scoped
        advisory locks on the cluster (with ``cluster_limit``), the manager id, then the key, on
        PostgreSQL.
        """
        async with self._write() as s:
            names = [CLUSTER_LOCK] if cluster_limit is not None else []
            names += [node.manager_id] + ([f"key:{quota.key_id}"] if quota else [])
            await self._lock(s, *names)
            live = int(await s.scalar(_live_count(node.manager_id)) or 0)
            cluster = int(await s.scalar(_cluster_live_count()) or 0) if cluster_limit is not None else 0
            usage = await self._key_usage(s, quota) if quota else {}
            refused = usage.get("refused_by")
            if cluster_limit is not None and cluster >= cluster_limit:
                refused = "cluster_max_nodes"
            elif live >= limit:
                refused = "max_nodes"
            if refused is None:
                s.add(node)
                if not node.pooled:
                    s.add(SessionEvent(short_id=node.short_id, owner=node.owner, kind="created", at=utcnow()))
            return Admission(refused is None, live, **{**usage, "refused_by": refused, "cluster": cluster})

    async def count_pooled(self, manager_id: str) -> int:
        async with self._read() as s:
            q = (
                select(func.count())
                .select_from(ToolServerNode)
                .where(ToolServerNode.manager_id == manager_id, ToolServerNode.pooled.is_(True))
            )
            return int(await s.scalar(q) or 0)

    async def claim_pooled(
        self,
        manager_id: str,
        health: str | None,
        *,
        creator: str,
        deadline: datetime,
        owner: str | None = None,
        labels: dict[str, str] | None = None,
        quota: KeyQuota | None = None,
    ) -> tuple[ToolServerNode | None, Admission]:
        """Take one ready pool node for a session of ``owner``; atomic across processes sharing the database.

        A node qualifies when in the pool, running and, if ``health`` is given, with that health.
        It leaves the pool as ``starting``, owned by ``creator`` until ``deadline`` (until its
        cookie is handed over, see :meth:`hand_over`). One ``UPDATE … WHERE id = (SELECT … FOR
        UPDATE SKIP LOCKED) AND pooled RETURNING`` statement: PostgreSQL hands concurrent claimers
        different rows, SQLite serialises writers. With a ``quota`` the key's usage is checked
        first, under the key's lock (as in :meth:`admit_node`).
        """
        pick = select(ToolServerNode.id).where(
            ToolServerNode.manager_id == manager_id,
            ToolServerNode.pooled.is_(True),
            ToolServerNode.ownership == Ownership.POOL,
            ToolServerNode.status == NodeStatus.RUNNING,
        )
        if health is not None:
            pick = pick.where(ToolServerNode.health == health)
        pick = pick.limit(1).with_for_update(skip_locked=True).scalar_subquery()
        claim = (
            update(ToolServerNode)
            .where(ToolServerNode.id == pick, ToolServerNode.pooled.is_(True))
            .values(
                pooled=False,
                ownership=Ownership.STARTING,
                creator=creator,
                deadline=deadline,
                last_req_time=utcnow(),
                owner=owner,
                labels=labels or {},
            )
            .returning(ToolServerNode)
        )
        async with self._write() as s:
            usage: dict[str, Any] = {}
            if quota is not None:
                await self._lock(s, f"key:{quota.key_id}")
                usage = await self._key_usage(s, quota)
                if usage["refused_by"]:
                    return None, Admission(False, **usage)
            node = (await s.scalars(claim)).one_or_none()
            if node is not None:
                s.add(SessionEvent(short_id=node.short_id, owner=owner, kind="claimed", at=utcnow()))
            return node, Admission(True, **usage)

    async def hand_over(self, node_id: str) -> bool:
        """Make a ``starting`` record its session's: the cookie is about to go out. False when the
        record is no longer ``starting`` (a checker removed it past its deadline, say)."""
        q = (
            update(ToolServerNode)
            .where(ToolServerNode.id == node_id, ToolServerNode.ownership == Ownership.STARTING)
            .values(ownership=Ownership.SESSION, creator=None, deadline=None, last_req_time=utcnow())
        )
        async with self._write() as s:
            return bool((await s.execute(q)).rowcount)

    async def mark_releasing(self, node_id: str, ownership: str) -> bool:
        """Make a record ``releasing`` if it is still ``ownership``; False when it changed (a
        hand-over won the race, say) or is gone."""
        q = (
            update(ToolServerNode)
            .where(ToolServerNode.id == node_id, ToolServerNode.ownership == ownership)
            .values(ownership=Ownership.RELEASING, creator=None, deadline=None)
        )
        async with self._write() as s:
            return bool((await s.execute(q)).rowcount)

    async def update_node(self, node_id: str, **fields: Any) -> None:
        await self.update_nodes({node_id: fields})

    async def update_nodes(self, changes: Mapping[str, Mapping[str, Any]]) -> None:
        """Apply per-node field updates in one transaction: one executemany per set of fields.

        ``UPDATE … WHERE id = :id`` in Core: a record deleted meanwhile simply matches no row (an
        ORM bulk update would fail the whole batch with StaleDataError).
        """
        if not changes:
            return
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for node_id, fields in changes.items():
            keys = tuple(sorted(fields))
            groups.setdefault(keys, []).append({"b_id": node_id, **{f"b_{k}": v for k, v in fields.items()}})
        async with self._write() as s:
            for keys, rows in groups.items():
                values = {k: bindparam(f"b_{k}", type_=_NODES.c[k].type) for k in keys}
                q = update(_NODES).where(_NODES.c.id == bindparam("b_id")).values(values)
                await s.execute(q, rows)

    async def touch_nodes(self, times: Mapping[str, datetime]) -> None:
        """Write buffered last request times; a time never moves a record's backwards, and a
        record deleted meanwhile is skipped."""
        if not times:
            return
        q = (
            update(_NODES)
            .where(_NODES.c.id == bindparam("b_id"), _NODES.c.last_req_time < bindparam("b_when"))
            .values(last_req_time=bindparam("b_when"))
        )
        async with self._write() as s:
            await s.execute(q, [{"b_id": node_id, "b_when": when} for node_id, when in times.items()])

    async def delete_nodes(self, node_ids: Iterable[str]) -> None:
        ids = list(node_ids)
        if ids:
            async with self._write() as s:
                await s.execute(delete(ToolServerNode).where(ToolServerNode.id.in_(ids)))

    async def get_node_by_short_id(self, short_id: str) -> ToolServerNode | None:
        async with self._read() as s:
            return (
                await s.scalars(select(ToolServerNode).where(ToolServerNode.short_id == short_id))
            ).one_or_none()

    async def count_live_owned(self, owner: str) -> int:
        """Live sessions of API key ``owner`` (in every manager sharing the database)."""
        async with self._read() as s:
            return int(await s.scalar(_owned_live_count(owner)) or 0)

    async def session_counts(self, manager_id: str) -> list[tuple[str | None, str, bool, int]]:
        """``(owner, status, pooled, count)`` for the nodes of ``manager_id``."""
        q = (
            select(ToolServerNode.owner, ToolServerNode.status, ToolServerNode.pooled, func.count())
            .where(ToolServerNode.manager_id == manager_id)
            .group_by(ToolServerNode.owner, ToolServerNode.status, ToolServerNode.pooled)
        )
        async with self._read() as s:
            return [(o, st, bool(p), int(n)) for o, st, p, n in (await s.execute(q)).all()]

    # ---- session events -----------------------------------------------------------------------------

    async def add_events(self, events: Iterable[SessionEvent]) -> None:
        rows = list(events)
        if rows:
            async with self._write() as s:
                s.add_all(rows)

    async def recent_events(self, short_id: str, limit: int = 50) -> list[SessionEvent]:
        """The newest ``limit`` events of a session, oldest first."""
        q = (
            select(SessionEvent)
            .where(SessionEvent.short_id == short_id)
            .order_by(SessionEvent.at.desc(), SessionEvent.id.desc())
            .limit(limit)
        )
        async with self._read() as s:
            return list(reversed(list(await s.scalars(q))))

    async def prune_events(self, before: datetime) -> None:
        async with self._write() as s:
            await s.execute(delete(SessionEvent).where(SessionEvent.at < before))

    # ---- API keys -----------------------------------------------------------------------------------

    async def add_key(self, key: ApiKey) -> None:
        async with self._write() as s:
            s.add(key)

    async def get_key(self, key_id: str) -> ApiKey | None:
        async with self._read() as s:
            return await s.get(ApiKey, key_id)

    async def list_keys(self) -> list[ApiKey]:
        async with self._read() as s:
            return list(await s.scalars(select(ApiKey).order_by(ApiKey.created_at)))

    async def update_key(self, key_id: str, **fields: Any) -> None:
        async with self._write() as s:
            await s.execute(update(ApiKey).where(ApiKey.id == key_id).values(**fields))

    # ---- checkers -----------------------------------------------------------------------------------

    async def get_checker(self, manager_id: str) -> NodeChecker | None:
        async with self._read() as s:
            return await s.get(NodeChecker, manager_id)

    async def delete_stale_checkers(self, stale_after: float) -> list[str]:
        """Delete checker records whose process is gone; returns their manager ids.

        On this host a record is stale when its pid is not alive; elsewhere when its heartbeat is
        older than ``stale_after`` seconds.
        """
        host = socket.gethostname()
        limit = utcnow() - timedelta(seconds=stale_after)
        async with self._read() as s:
            rows = list(await s.scalars(select(NodeChecker)))
        stale = [
            r.manager_id
            for r in rows
            if (r.host == host and not pid_alive(r.pid)) or (r.host != host and r.heartbeat_at < limit)
        ]
        if stale:
            async with self._write() as s:
                await s.execute(delete(NodeChecker).where(NodeChecker.manager_id.in_(stale)))
        return stale

    async def register_checker(self, manager_id: str, pid: int, interval: float) -> bool:
        """Insert this process's checker record; False when a live one holds ``manager_id``."""
        try:
            async with self._write() as s:
                s.add(
                    NodeChecker(
                        manager_id=manager_id,
                        pid=pid,
                        interval=interval,
                        host=socket.gethostname(),
                        heartbeat_at=utcnow(),
                    )
                )
        except IntegrityError:
            return False
        return True

    async def heartbeat_checker(self, manager_id: str, pid: int) -> bool:
        """Refresh the heartbeat; False when the record is gone (the loop must end)."""
        async with self._write() as s:
            res = await s.execute(
                update(NodeChecker)
                .where(NodeChecker.manager_id == manager_id, NodeChecker.pid == pid)
                .values(heartbeat_at=utcnow())
            )
            return bool(res.rowcount)

    async def delete_checker(self, manager_id: str, pid: int | None = None) -> None:
        async with self._write() as s:
            q = delete(NodeChecker).where(NodeChecker.manager_id == manager_id)
            if pid is not None:
                q = q.where(NodeChecker.pid == pid)
            await s.execute(q)


async def open_store(url: str) -> Store:
    store = Store(url)
    await store.migrate()
    return store


async def wait_for_database(url: str, wait_seconds: float) -> None:
    """Return once the database answers, waiting up to ``wait_seconds`` for it (a manager may start
    before its database, as a stack's services do); DatabaseUnavailable naming it after that. A
    SQLite file either opens or does not: it is not waited for. (The manager migrates it afterwards.)"""
    try:
        store = Store(url)
    except OSError as exc:  # the SQLite file's directory cannot be made
        where = make_url(url).render_as_string(hide_password=True)
        raise DatabaseUnavailable(f"{where}: {exc.filename}: {exc.strerror}") from None
    where = store.url.render_as_string(hide_password=True)
    if store.url.get_backend_name() == "sqlite":
        wait_seconds = 0
    deadline = asyncio.get_running_loop().time() + wait_seconds
    waiting = False
    try:
        while True:
            try:
                await store.ping()
                break
            except DatabaseUnavailable as exc:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    waited = f" after {wait_seconds:g} s" if wait_seconds else ""
                    raise DatabaseUnavailable(f"{where}: {exc}{waited}") from None
                if not waiting:
                    log.warning("%s: %s; waiting up to %g s for it", where, exc, wait_seconds)
                    waiting = True
                await asyncio.sleep(min(1.0, left))
        if waiting:
            log.info("%s answers", where)
    finally:
        await store.aclose()


__all__ = [
    "Admission",
    "KeyQuota",
    "Store",
    "creator_alive",
    "open_store",
    "pid_alive",
    "this_process",
    "wait_for_database",
]
