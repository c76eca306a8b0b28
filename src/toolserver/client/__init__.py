"""Python SDK for a ToolServer manager: :class:`ToolServerClient` (sync) and :class:`AsyncToolServerClient`.

::

    from toolserver.client import ToolServerClient

    with ToolServerClient("http://127.0.0.1:8080") as client, client.create_session() as s:
        print(s.run("ls -la", on_stdout=print).exit_code)
        s.files.write("data.csv", "x,y\\n1,2\\n")
        plot = s.python("import pandas as pd; pd.read_csv('data.csv').plot()")
        open("plot.png", "wb").write(plot.images[0].data)

A manager with ``auth: api_keys`` needs a key: ``ToolServerClient(url, api_key="tsk_…")``, or
``$TOOLSERVER_API_KEY``, or credentials in the URL (``http://key:tsk_…@host:8080``).

A session is its cookie (``session.session_id``): ``client.connect(session_id)`` picks it up again,
from another process too. Error answers raise typed subclasses of
:class:`toolserver.errors.ClientError` (see that module). Uploads and downloads are streamed.
"""

from toolserver.client._wire import API_KEY_ENV, DEFAULT_TIMEOUT, DEFAULT_URL, unwrap
from toolserver.client.aio import AsyncCommandHandle, AsyncFiles, AsyncSession, AsyncToolServerClient
from toolserver.client.results import (
    BinaryOutput,
    CommandInfo,
    CommandResult,
    FileInfo,
    PythonResult,
    SessionInfo,
    SessionState,
)
from toolserver.client.sync import CommandHandle, Files, Session, ToolServerClient
from toolserver.errors import (
    AccessDeniedError,
    BadArgumentsError,
    CapacityExceededError,
    ClientError,
    NodeNotReadyError,
    NotFoundError,
    OutputNotReadyError,
    SessionNotFoundError,
    StreamBrokenError,
    ToolFailedError,
    ToolNotFoundError,
)

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_TIMEOUT",
    "DEFAULT_URL",
    "AccessDeniedError",
    "AsyncCommandHandle",
    "AsyncFiles",
    "AsyncSession",
    "AsyncToolServerClient",
    "BadArgumentsError",
    "BinaryOutput",
    "CapacityExceededError",
    "ClientError",
    "CommandHandle",
    "CommandInfo",
    "CommandResult",
    "FileInfo",
    "Files",
    "NodeNotReadyError",
    "NotFoundError",
    "OutputNotReadyError",
    "PythonResult",
    "Session",
    "SessionInfo",
    "SessionNotFoundError",
    "SessionState",
    "StreamBrokenError",
    "ToolFailedError",
    "ToolNotFoundError",
    "ToolServerClient",
    "unwrap",
]
