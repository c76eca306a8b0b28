"""A session's lifetime as the checker sees it: its absolute expiry, its idle limit, and what an
idle node gets (``node.idle_action``: stopped, or paused with its memory).

A session's expiry (``expires_at``) is set when it starts (``timeout_seconds``, else
``sessions.default_timeout_seconds``) and moved only by ``/extend_session`` or a reconnect that
gives ``timeout_seconds``; past it the checker releases the session (event ``expired``).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from toolserver.manager.models import Asleep, ToolServerNode
from toolserver.manager.settings import NodeSettings
from toolserver.states import STOPPED_STATUSES, NodeStatus

if TYPE_CHECKING:
    from toolserver.manager.sessions import SessionService

#: Statuses of a node that holds no running processes for its session: released after
#: node.idling_release_minutes in them.
ASLEEP_STATUSES = STOPPED_STATUSES | {NodeStatus.PAUSED}


def lifetime_over(node: ToolServerNode, now: datetime) -> str | None:
    """Why the session's lifetime is over (None while it is not)."""
    if node.expires_at is None or now < node.expires_at:
        return None
    return f"its lifetime ended at {node.expires_at.isoformat(timespec='seconds')}Z (timeout_seconds)"


def idle_limit(node: ToolServerNode, cfg: NodeSettings) -> timedelta:
    """How long the session's node may go without requests: its own idle_seconds, else the manager's."""
    if node.idle_seconds:
        return timedelta(seconds=node.idle_seconds)
    return timedelta(minutes=cfg.idling_close_minutes)


def idle_reason(node: ToolServerNode, cfg: NodeSettings) -> str:
    if node.idle_seconds:
        return f"idle for {node.idle_seconds:g} s (the session's idle_seconds)"
    return f"idle for {cfg.idling_close_minutes:g} min (node.idling_close_minutes)"


async def put_to_sleep(sessions: SessionService, node: ToolServerNode) -> None:
    """Stop or pause an idle node (node.idle_action); either way the next request wakes it. A tier
    that cannot pause stops it instead."""
    cfg = sessions.settings.node
    why = idle_reason(node, cfg)
    if cfg.idle_action == "pause" and "pause" in sessions.runtime.capabilities:
        await sessions.sleep.pause_node(node, why, asleep=Asleep.PAUSED)
    else:
        await sessions.close_node(node, why, asleep=Asleep.STOPPED)
