"""The one exception tree of ToolServer.

::

    ToolServerError
    ├── ConfigError                 bad or unknown configuration key/value
    ├── RuntimeBackendError         a runtime (process, docker) failed to do what it was asked
    │   ├── RuntimeUnavailable      the runtime backend cannot be reached (e.g. Docker Engine down)
    │   └── NodeNotFound            the runtime has no such node (already gone)
    ├── NodeStartError              a node did not become ready (failed or timed out)
    ├── DatabaseUnavailable         the records' database cannot be reached (503, retry later)
    ├── SessionError                a session request cannot be served
    │   ├── InvalidSession          missing/unknown node_id (403)
    │   ├── NotYourSession          the session belongs to another API key (403)
    │   ├── UnknownSession          no session with that short id (admin API, 404)
    │   ├── InvalidRequest          a bad parameter of a session route (422)
    │   ├── SessionConflict         the session's node cannot do that now, or its tier never can (409)
    │   ├── Draining                the manager takes no new sessions (503)
    │   ├── CapacityExceeded        node.max_nodes reached (429, Retry-After)
    │   │   └── QuotaExceeded       an API key's quota reached; names the quota (429, Retry-After)
    │   └── NodeUnavailable         the session's node is not running or does not answer (503/504)
    ├── AccessError                 the caller may not make this request
    │   ├── NotAuthenticated        no API key, or an unknown, revoked or expired one (401)
    │   └── AdminRequired           an admin route called with a user key (403)
    ├── ResourceError               a workspace file cannot be served as an MCP resource
    │   └── ResourceTooLarge        larger than mcp.resource_max_bytes
    ├── ToolError                   raised inside a node while running a tool
    │   ├── ToolNotFound            no tool by that name (404)
    │   ├── ToolArgumentError       arguments fail the tool's schema (422)
    │   ├── OutputNotReady          long-running work, fetch later (450)
    │   │   └── ToolTimeout         a tool ran out of time; carries its partial output (450)
    │   ├── WorkspacePathError      a path escapes the workspace (400)
    │   ├── ToolCancelled           the client went away mid-call; the tool was stopped (499)
    │   └── ToolRegistrationError   a tool cannot be registered (duplicate, bad code)
    └── ClientError                 raised by toolserver.client for an error answer (status_code, body)
        ├── AccessDeniedError       401 no or a bad API key, 403 another key's session or an admin route
        ├── SessionNotFoundError    403 invalid node_id: released, or never existed
        ├── CapacityExceededError   429 node.max_nodes or a quota; ``retry_after`` seconds
        ├── NodeNotReadyError       503/504 the node failed to start, is stopped or not answering
        ├── NotFoundError           404 a workspace file or a command that is not there
        │   └── ToolNotFoundError   404 from execute_tool: no tool by that name
        ├── BadArgumentsError       400/422 bad arguments; ``field`` names the one at fault
        ├── ToolFailedError         500 the tool failed; the message is the node's
        │   └── OutputNotReadyError 450 still running; ``partial`` holds the output so far
        └── StreamBrokenError       a streamed answer ended before it was complete
"""

from __future__ import annotations


class ToolServerError(Exception):
    """Root of every error that ToolServer raises on purpose."""


class ConfigError(ToolServerError):
    """Configuration is invalid; the message names the offending key."""


class RuntimeBackendError(ToolServerError):
    """A runtime backend failed an operation."""


class RuntimeUnavailable(RuntimeBackendError):
    """The runtime backend cannot be reached at all (e.g. the Docker Engine is down)."""


class NodeNotFound(RuntimeBackendError):
    """The runtime has no node for the given state: it is already gone."""


class NodeStartError(ToolServerError):
    """A node failed to start or did not become ready in time."""


class DatabaseUnavailable(ToolServerError):
    """The database holding the records cannot be reached or failed the operation."""


class SessionError(ToolServerError):
    """A session request cannot be served."""


class InvalidSession(SessionError):
    """The node_id is missing or unknown."""


class NotYourSession(SessionError):
    """The session exists but belongs to another API key (admin keys act on every session)."""


class UnknownSession(SessionError):
    """No session has the short id an admin route was given."""


class Draining(SessionError):
    """The manager is draining: existing sessions keep working, new ones go to another manager."""


class InvalidRequest(SessionError):
    """A session route got a parameter it cannot use; the message says which and why."""


class SessionConflict(SessionError):
    """The session's node is in no state for the request (pausing a stopped node), or its tier
    lacks the capability (pause, fork); the message names which."""


class CapacityExceeded(SessionError):
    """The manager already runs node.max_nodes nodes; ``retry_after`` is in seconds."""

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QuotaExceeded(CapacityExceeded):
    """An API key reached one of its quotas; ``quota`` names it (``max_sessions``, ``starts_per_minute``)."""

    def __init__(self, message: str, quota: str, retry_after: int = 5) -> None:
        super().__init__(message, retry_after)
        self.quota = quota


class AccessError(ToolServerError):
    """The caller may not make this request."""


class NotAuthenticated(AccessError):
    """The request carries no API key, or one that is unknown, revoked or expired."""


class AdminRequired(AccessError):
    """The route needs an admin key."""


class NodeConnectionError(ToolServerError):
    """The proxy's connection to a node failed: refused, reset, or closed before the answer ended."""


class NodeUnavailable(SessionError):
    """The session's node is not running or did not answer; ``status_code`` is 503 or 504."""

    def __init__(self, message: str, status_code: int = 503) -> None:
        super().__init__(message)
        self.status_code = status_code


class ResourceError(ToolServerError):
    """A workspace file cannot be served as an MCP resource; the message says why."""


class ResourceTooLarge(ResourceError):
    """The file is larger than ``mcp.resource_max_bytes``."""


class ToolError(ToolServerError):
    """An error raised while running a tool inside a node."""

    status_code = 500


class ToolNotFound(ToolError):
    status_code = 404


class ToolArgumentError(ToolError):
    status_code = 422


class OutputNotReady(ToolError):
    """Work continues in the background; the message says how to fetch its output later."""

    status_code = 450


class ToolTimeout(OutputNotReady):
    """A tool ran past its time limit; ``partial`` holds what it produced so far (JSON-able or None)."""

    def __init__(self, message: str, partial: object = None) -> None:
        super().__init__(message)
        self.partial = partial


class WorkspacePathError(ToolError):
    status_code = 400


class ToolCancelled(ToolError):
    """The client closed its connection during the call, so the node cancelled the tool."""

    status_code = 499


class ToolRegistrationError(ToolError):
    status_code = 400


class ClientError(ToolServerError):
    """An error answer received by the client SDK (or no usable answer at all)."""

    def __init__(
        self,
        message: str,
        status_code: int | None = None,
        body: object = None,
        *,
        retry_after: float | None = None,
        field: str | None = None,
        partial: object = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = body
        #: seconds the server asked to wait before trying again (Retry-After), where it said
        self.retry_after = retry_after
        #: the argument or key the server named as wrong, where it named one
        self.field = field
        #: what a tool produced before it ran out of time (450 answers)
        self.partial = partial


class AccessDeniedError(ClientError):
    """The manager refused the caller: no valid API key (401), or not this key's to use (403)."""


class SessionNotFoundError(ClientError):
    """The session is unknown to the manager: released, or it never existed."""


class CapacityExceededError(ClientError):
    """The manager runs all the nodes it may (or a quota is used up): retry after ``retry_after``."""


class NodeNotReadyError(ClientError):
    """The session's node cannot serve now: it failed to start, is stopped, or does not answer."""


class NotFoundError(ClientError):
    """A workspace file or a command that is not there."""


class ToolNotFoundError(NotFoundError):
    """No tool by that name on the node."""


class BadArgumentsError(ClientError):
    """The request's arguments are wrong; ``field`` names the one at fault when the server said."""


class ToolFailedError(ClientError):
    """The tool ran and failed; the message is the node's."""


class OutputNotReadyError(ToolFailedError):
    """The tool is still running (450): ``partial`` has its output so far (and a ``shell_id``)."""


class StreamBrokenError(ClientError):
    """A streamed answer (command output) ended before its last event."""
