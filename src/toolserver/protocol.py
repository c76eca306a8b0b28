"""Wire-level names and models shared by the manager, the node and the client."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

#: Cookie that carries a session's node id (XAgent's client relies on this name).
COOKIE_NAME = "node_id"
#: Header the manager adds to every forwarded request; the node refuses requests without it.
SECRET_HEADER = "X-ToolServer-Node-Secret"
#: Request header by which a client asks the proxy to cancel its call when it disconnects (any value).
CANCEL_ON_DISCONNECT_HEADER = "X-ToolServer-Cancel-On-Disconnect"
#: Environment variable through which a runtime hands the secret to the node process.
SECRET_ENV = "TOOLSERVER_NODE_SECRET"
#: Seconds the manager asks a client to wait (Retry-After) on 429 and on 503 for a database outage.
RETRY_AFTER_SECONDS = 5
#: Status code XAgent uses for "output not ready yet".
STATUS_OUTPUT_NOT_READY = 450
#: Media type of the node's streamed command output: one JSON event per line.
NDJSON_MEDIA_TYPE = "application/x-ndjson"

#: Node paths the manager forwards by default (XAgent's manager.yml ``redirect_to_node_path``).
DEFAULT_REDIRECT_POST = [
    "/",
    "/execute_tool",
    "/upload_file",
    "/download_file",
    "/download_workspace",
    "/get_workspace_structure",
    "/get_available_tools",
    "/retrieving_tools",
    "/get_json_schema_for_tools",
    "/get_json_schema_for_envs",
    "/register_new_tool",
    # streamed commands, workspace files (ToolServer's own)
    "/commands",
    "/commands/connect",
    "/commands/stdin",
    "/commands/kill",
    "/files/list",
    "/files/stat",
    "/files/remove",
]
#: ``/commands`` lists the commands; ``/terminal`` is the WebSocket of an interactive terminal.
DEFAULT_REDIRECT_GET = ["/", "/commands", "/terminal"]


class _Wire(BaseModel):
    """A request body. Validators are built on first use, not at import: a node's start waits
    for its imports, and each model costs milliseconds to build (the node builds them right after
    it reports healthy, see :func:`toolserver.node.app.warm_up`)."""

    model_config = ConfigDict(defer_build=True)


class ExecuteToolRequest(_Wire):
    tool_name: str
    arguments: dict[str, Any] | str = Field(default_factory=dict)
    env_name: str | None = None


class DownloadFileRequest(_Wire):
    file_path: str


class ToolNamesRequest(_Wire):
    tool_names: list[str]


class EnvNamesRequest(_Wire):
    env_names: list[str]


class RetrieveToolsRequest(_Wire):
    question: str
    top_k: int = Field(default=5, ge=1, le=100)


class RegisterToolRequest(_Wire):
    tool_name: str
    code: str


def _printable(text: str) -> str:
    """``text`` unless it holds control characters or unpaired surrogates (which no JSON answer carries)."""
    if not text.isprintable():
        raise ValueError("must be printable text (no control characters)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no unpaired surrogates)") from None
    return text


#: Label names: a letter or digit, then letters, digits and ``_ . - /``; at most 63 characters.
LabelName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,62}$")]
LabelValue = Annotated[str, StringConstraints(max_length=256), AfterValidator(_printable)]
MAX_LABELS = 32


#: Text a process can take: no NUL byte (the operating system cannot pass one).
ProcessText = Annotated[str, StringConstraints(pattern=r"^[^\x00]*$")]
EnvName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=256)]


#: Most environment variables a session may set (``env`` of the session options).
MAX_SESSION_ENV = 64
#: Answer header with the session's expiry (ISO 8601 UTC; absent when it has none).
EXPIRES_HEADER = "X-Session-Expires"
#: Answer header on a request that woke its node: ``resumed`` (memory kept) or ``restarted`` (workspace only).
WOKEN_HEADER = "X-Node-Woken"


class SessionResources(_Wire):
    """Resource limits a session asks for (``resources``); unset keys take ``node.resources``."""

    model_config = ConfigDict(extra="forbid")

    memory: Annotated[str, StringConstraints(pattern=r"^[0-9]+(\.[0-9]+)?[bkmgBKMG]?$")] | None = Field(
        None, description="memory limit, Docker syntax: 512m, 2g"
    )
    cpus: float | None = Field(None, gt=0, allow_inf_nan=False)
    pids_limit: int | None = Field(None, gt=0)


class SessionOptions(_Wire):
    """Options of a new session: the optional JSON body of ``/get_cookie``.

    The one place session options are read: every option is a field here, unknown keys are
    refused (422 naming the key), and an empty body (XAgent's) means all defaults. Maximums are
    the operator's (``sessions.*``) and are checked by the manager (:mod:`toolserver.manager.options`).
    """

    model_config = ConfigDict(extra="forbid", defer_build=True)

    labels: dict[LabelName, LabelValue] = Field(
        default_factory=dict,
        max_length=MAX_LABELS,
        description='free-form labels of the session, e.g. {"team": "search"}; filterable in the admin API',
    )
    timeout_seconds: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="absolute lifetime: the session is released this long after it starts "
        "(at most sessions.max_timeout_seconds; default sessions.default_timeout_seconds)",
    )
    idle_seconds: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="stop (or pause, node.idle_action) the node after this long without requests "
        "(at most sessions.max_idle_seconds; default node.idling_close_minutes)",
    )
    env: dict[EnvName, ProcessText] = Field(
        default_factory=dict,
        max_length=MAX_SESSION_ENV,
        description="environment variables of the node's tools (over node.env)",
    )
    resources: SessionResources | None = Field(
        None, description="resource limits of the node, within sessions.max_resources"
    )
    network: str | None = Field(
        None, max_length=255, description="the network the node joins: one of sessions.networks"
    )
    isolation: str | None = Field(
        None, max_length=64, description="the isolation tier; only the manager's own is accepted"
    )

    def shapes_node(self) -> bool:
        """Whether the node itself must differ from a default one (a warm-pool node cannot serve)."""
        return bool(self.env) or self.resources is not None or self.network is not None


class ExtendRequest(BaseModel):
    """``POST /extend_session``: the session's lifetime from now (``timeout_seconds``)."""

    model_config = ConfigDict(extra="forbid")

    timeout_seconds: float = Field(gt=0, allow_inf_nan=False, description="seconds from now")


class ReconnectOptions(BaseModel):
    """The optional body of ``/reconnect_session``: a new lifetime, from now."""

    model_config = ConfigDict(extra="forbid")

    timeout_seconds: float | None = Field(None, gt=0, allow_inf_nan=False, description="seconds from now")


class _Body(_Wire):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, defer_build=True)


class CommandRequest(_Body):
    """``POST /commands``: run ``command`` with bash in the workspace."""

    command: Annotated[ProcessText, StringConstraints(min_length=1)]
    background: bool = Field(False, description="answer at once with the command's id; it runs on")
    stdin: bool = Field(False, description="open the command's stdin (POST /commands/stdin writes it)")
    timeout: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="seconds after which the command is killed"
    )
    cwd: ProcessText | None = Field(None, description="working directory, relative to the workspace")
    env: dict[EnvName, ProcessText] | None = Field(None, description="extra environment variables")


class CommandConnectRequest(_Body):
    """``POST /commands/connect``: stream a command's output, from its start or from now."""

    id: int
    from_: Literal["start", "now"] = Field("start", alias="from")
    follow: bool = Field(True, description="false: only the output so far, then the stream ends")


class CommandStdinRequest(_Body):
    """``POST /commands/stdin``: write ``data`` to a command's stdin; ``eof`` closes it afterwards."""

    id: int
    data: str = ""
    eof: bool = False


class CommandIdRequest(_Body):
    """``POST /commands/kill``."""

    id: int


class FilePathRequest(_Body):
    """``POST /files/list``, ``/files/stat`` and ``/files/remove``: a workspace path."""

    path: str = "."
    recursive: bool = Field(False, description="/files/remove: also a directory with everything in it")
