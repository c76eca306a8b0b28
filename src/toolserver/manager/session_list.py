"""``GET /sessions``: the caller's sessions, optionally filtered by labels (``?label=key=value``).

Each session as ``{"session_id", "short_id", "status", "health", "labels", "created_at",
"last_req_time"}``; ``session_id`` is the cookie (``client.connect(session_id)`` uses it). A
caller sees the sessions its API key opened; an admin key (and everyone with ``auth: none``) sees
every session. Every manager sharing the database is listed: behind a load balancer any replica
answers, and the list must not depend on which one did. Pool nodes, creates whose cookie has not
gone out and releases under way are no one's session and never listed.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from toolserver.errors import InvalidRequest
from toolserver.manager.activity import ActivityBuffer
from toolserver.manager.auth import Caller
from toolserver.manager.models import Ownership
from toolserver.manager.store import Store


def parse_label_filters(values: list[str]) -> dict[str, str]:
    """``["team=a", "run=7"]`` → ``{"team": "a", "run": "7"}``; InvalidRequest on a bad one."""
    filters: dict[str, str] = {}
    for value in values:
        key, sep, wanted = value.partition("=")
        if not sep or not key:
            raise InvalidRequest(f"label filter {value!r} is not key=value (e.g. ?label=team=search)")
        filters[key] = wanted
    return filters


def _iso(when: datetime) -> str:
    return when.isoformat() + "Z"


async def list_sessions(
    store: Store, activity: ActivityBuffer, caller: Caller, labels: dict[str, str]
) -> dict[str, Any]:
    """The sessions that ``caller`` may use and that carry every label of ``labels``, oldest first."""
    nodes = sorted(await store.list_nodes(None), key=lambda n: n.created_at)
    sessions = []
    for node in nodes:
        own = dict(node.labels or {})
        if (
            node.ownership != Ownership.SESSION  # a create or release under way is no one's session yet
            or not caller.may_act_on(node.owner)
            or any(own.get(k) != v for k, v in labels.items())
        ):
            continue
        last = max(node.last_req_time, activity.pending(node.id) or node.last_req_time)
        sessions.append(
            {
                "session_id": node.id,
                "short_id": node.short_id,
                "status": node.status,
                "health": node.health,
                "labels": own,
                "created_at": _iso(node.created_at),
                "last_req_time": _iso(last),
            }
        )
    return {"sessions": sessions}
