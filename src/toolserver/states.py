"""The words of a node's life, in one place: its status and its health.

Runtimes report Docker's words (``created``, ``running``, ``restarting``, ``paused``, ``exited``,
``dead``; health ``starting``, ``healthy``, ``unhealthy``); a record starts with the seed's
defaults (``Created``, ``Unknown``) until the runtime has spoken. Both are ``StrEnum``s, so a
member equals its word and the database keeps plain strings.
"""

from __future__ import annotations

from enum import StrEnum


class NodeStatus(StrEnum):
    #: The seed's default: the record exists, the runtime has not created the node yet.
    NEW = "Created"
    CREATED = "created"
    RUNNING = "running"
    RESTARTING = "restarting"
    PAUSED = "paused"
    EXITED = "exited"
    DEAD = "dead"


class NodeHealth(StrEnum):
    #: The seed's default, and what a runtime reports when it cannot say.
    UNKNOWN = "Unknown"
    STARTING = "starting"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


#: Statuses under which a node no longer serves (and no longer counts against node.max_nodes).
STOPPED_STATUSES = frozenset({NodeStatus.EXITED, NodeStatus.DEAD})

__all__ = ["STOPPED_STATUSES", "NodeHealth", "NodeStatus"]
