"""What the SDK's calls return: plain dataclasses, the same for the sync and the async client."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

T = TypeVar("T")


def from_json(cls: type[T], data: dict[str, Any]) -> T:
    """An instance of dataclass ``cls`` from a JSON object (keys it does not know are ignored)."""
    return cls(**{f.name: data.get(f.name) for f in fields(cls)})  # type: ignore[arg-type]


@dataclass(frozen=True)
class BinaryOutput:
    """A ``{"type": "binary"}`` tool result, decoded: an image (a plot) or a file."""

    media_type: str
    name: str
    data: bytes


@dataclass(frozen=True)
class SessionInfo:
    """One session as ``GET /sessions`` lists it; ``session_id`` is what ``connect`` takes."""

    session_id: str
    short_id: str
    status: str
    health: str
    labels: dict[str, str]
    created_at: str
    last_req_time: str


@dataclass(frozen=True)
class SessionState:
    """A session's state as ``pause``, ``resume`` and ``extend`` report it."""

    #: the short id (what the admin API and the events name)
    session_id: str
    #: running, paused, exited, ...
    status: str
    #: ISO 8601 UTC; None when the session never expires
    expires_at: str | None


@dataclass(frozen=True)
class CommandResult:
    """A command that has ended (or, from ``CommandHandle.output()``, its output so far)."""

    id: int
    stdout: str
    stderr: str
    #: None while the command runs; negative when a signal ended it (-9: SIGKILL)
    exit_code: int | None
    #: running, exited, killed (by ``kill``) or timeout (killed after its ``timeout``)
    status: str
    #: characters of output lost before what ``stdout``/``stderr`` hold (only the last part is kept)
    dropped: int = 0

    @property
    def ok(self) -> bool:
        """Whether the command exited with status 0."""
        return self.status == "exited" and self.exit_code == 0


@dataclass(frozen=True)
class CommandInfo:
    """A command as ``GET /commands`` lists it."""

    id: int
    command: str
    status: str
    exit_code: int | None
    background: bool
    started_at: float
    ended_at: float | None


@dataclass(frozen=True)
class PythonResult:
    """What a notebook cell printed and displayed; ``error`` holds the traceback when it raised."""

    text: str
    images: list[BinaryOutput] = field(default_factory=list)
    error: str | None = None
    cell_index: int | None = None


@dataclass(frozen=True)
class FileInfo:
    """A workspace entry: ``type`` is file, directory, symlink or other; ``size`` for files."""

    name: str
    path: str
    type: str
    size: int | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FileInfo:
        return cls(
            data.get("name") or data["path"].rsplit("/", 1)[-1], data["path"], data["type"], data.get("size")
        )
