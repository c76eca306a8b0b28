"""``toolserver nodes``: an operator's listing of the node records in a manager's database.

A record's ``id`` is the session cookie and ``secret`` the node's key: the listing never shows the
secret and shows only the id's first :data:`ID_PREFIX` characters, enough to match a session.
It only reads: no migration, and no database file created where there is none.
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from toolserver.manager.models import ToolServerNode, utcnow
from toolserver.manager.settings import Settings
from toolserver.manager.store import Store
from toolserver.runtimes.base import UNIX_PREFIX

#: How many characters of a session id (the cookie) the listing shows.
ID_PREFIX = 8
#: Longest detail shown in the table (``--json`` has it whole).
DETAIL_WIDTH = 60


async def read_nodes(database_url: str, manager_id: str | None) -> list[ToolServerNode]:
    """The node records of ``manager_id`` (of every manager when None), oldest first."""
    store = Store(database_url)
    try:
        query = select(ToolServerNode).order_by(ToolServerNode.created_at)
        if manager_id is not None:
            query = query.where(ToolServerNode.manager_id == manager_id)
        async with store.session() as s:
            return list(await s.scalars(query))
    finally:
        await store.aclose()


def redacted(node: ToolServerNode, now: datetime) -> dict[str, Any]:
    """What an operator may see of a record: no secret, only the start of the id."""
    return {
        "short_id": node.short_id,
        "session": node.id[:ID_PREFIX] + "…",
        "manager_id": node.manager_id,
        "status": node.status,
        "health": node.health,
        "address": node.ip if node.ip.startswith(UNIX_PREFIX) else f"{node.ip}:{node.port}",
        "pooled": node.pooled,
        "ownership": node.ownership,
        "created_at": node.created_at.isoformat() + "Z",
        "age_seconds": round((now - node.created_at).total_seconds()),
        "idle_seconds": round((now - node.last_req_time).total_seconds()),
        "detail": node.detail,
    }


def _duration(seconds: int) -> str:
    """``42s``, ``3m05s``, ``2h07m``, ``4d03h``."""
    seconds = max(seconds, 0)
    minutes, s = divmod(seconds, 60)
    hours, m = divmod(minutes, 60)
    days, h = divmod(hours, 24)
    if days:
        return f"{days}d{h:02d}h"
    if hours:
        return f"{hours}h{m:02d}m"
    return f"{minutes}m{s:02d}s" if minutes else f"{s}s"


def format_table(rows: list[dict[str, Any]], with_manager: bool = False) -> str:
    """The rows of :func:`redacted` as an aligned text table."""
    header = ["SHORT_ID", "SESSION", "MANAGER", "STATUS", "HEALTH", "ADDRESS", "OWNER", "CREATED", "IDLE"]
    table = [[*header, "DETAIL"]]
    for row in rows:
        detail = ((row["detail"] or "").strip().splitlines() or [""])[0]
        if len(detail) > DETAIL_WIDTH:
            detail = detail[: DETAIL_WIDTH - 1] + "…"
        age, idle = _duration(row["age_seconds"]) + " ago", _duration(row["idle_seconds"])
        table.append([row[k] for k in ("short_id", "session", "manager_id", "status", "health", "address")])
        table[-1] += [row["ownership"], age, idle, detail]
    if not with_manager:
        table = [line[:2] + line[3:] for line in table]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in table
    )


def _missing_sqlite_file(database_url: str) -> Path | None:
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    path = Path(url.database)
    return None if path.exists() else path


def print_nodes(settings: Settings, every: bool = False, as_json: bool = False) -> int:
    """Print this manager's node records (every manager's with ``every``); returns the exit status."""
    missing = _missing_sqlite_file(settings.database_url)
    if missing is not None:
        print(f"toolserver: no database at {missing} (has this manager run?)", file=sys.stderr)
        return 1
    try:
        nodes = asyncio.run(read_nodes(settings.database_url, None if every else settings.manager_id))
    except (SQLAlchemyError, OSError) as exc:
        where = make_url(settings.database_url).render_as_string(hide_password=True)
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        print(f"toolserver: cannot read the node records from {where}: {reason}", file=sys.stderr)
        return 1
    now = utcnow()
    rows = [redacted(node, now) for node in nodes]
    print(json.dumps(rows, indent=2, ensure_ascii=False) if as_json else format_table(rows, every))
    return 0
