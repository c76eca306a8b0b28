"""Async access to the records (SQLAlchemy 2). SQLite through aiosqlite by default; any async URL works."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import Select, bindparam, delete, event, func, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from toolserver.errors import DatabaseUnavailable
from toolserver.manager.models import NodeChecker, Ownership, ToolServerNode, utcnow
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


_NODES = ToolServerNode.__table__


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
        """Apply Alembic migrations up to head."""
        async with self.engine.begin() as conn:
            await conn.run_sync(_alembic_upgrade)

    async def aclose(self) -> None:
        await self.engine.dispose()

    # ---- nodes --------------------------------------------------------------------------------------

    async def add_node(self, node: ToolServerNode) -> None:
        async with self._write() as s:
            s.add(node)

    async def get_node(self, node_id: str) -> ToolServerNode | None:
        async with self._read() as s:
            return await s.get(ToolServerNode, node_id)

    async def list_nodes(self, manager_id: str) -> list[ToolServerNode]:
        async with self._read() as s:
            rows = await s.scalars(select(ToolServerNode).where(ToolServerNode.manager_id == manager_id))
            return list(rows)

    async def count_live_nodes(self, manager_id: str) -> int:
        async with self._read() as s:
            return int(await s.scalar(_live_count(manager_id)) or 0)

    async def add_node_within(self, node: ToolServerNode, limit: int) -> int:
        """Insert ``node`` unless its manager already has ``limit`` live nodes; returns that count.

        Atomic across the processes sharing the database: the count and the insert run under the
        database's write lock on SQLite (``BEGIN IMMEDIATE``) and under a transaction-scoped
        advisory lock on the manager id on PostgreSQL.
        """
        async with self._write() as s:
            backend = self.url.get_backend_name()
            if backend == "sqlite":
                await s.execute(text("BEGIN IMMEDIATE"))
            elif backend == "postgresql":
                await s.execute(select(func.pg_advisory_xact_lock(func.hashtext(node.manager_id))))
            live = int(await s.scalar(_live_count(node.manager_id)) or 0)
            if live < limit:
                s.add(node)
            return live

    async def count_pooled(self, manager_id: str) -> int:
        async with self._read() as s:
            q = (
                select(func.count())
                .select_from(ToolServerNode)
                .where(ToolServerNode.manager_id == manager_id, ToolServerNode.pooled.is_(True))
            )
            return int(await s.scalar(q) or 0)

    async def claim_pooled(
        self, manager_id: str, health: str | None, creator: str, deadline: datetime
    ) -> ToolServerNode | None:
        """Take one ready pool node for a session; atomic across processes sharing the database.

        A node qualifies when in the pool, running and, if ``health`` is given, with that health.
        It leaves the pool as ``starting``, owned by ``creator`` until ``deadline`` (until its
        cookie is handed over, see :meth:`hand_over`). One ``UPDATE … WHERE id = (SELECT … FOR
        UPDATE SKIP LOCKED) AND pooled RETURNING`` statement: PostgreSQL hands concurrent claimers
        different rows, SQLite serialises writers.
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
            )
            .returning(ToolServerNode)
        )
        async with self._write() as s:
            return (await s.scalars(claim)).one_or_none()

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


__all__ = ["Store", "creator_alive", "open_store", "pid_alive", "this_process"]
