"""The ``sandbox`` runtime's own config (``runtime_config`` with ``isolation: sandbox``)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from toolserver.runtimes.base import RuntimeConfig

_SIZE = re.compile(r"(\d+)\s*([kmgt]?)b?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str | int) -> int:
    """Bytes of a Docker-style size (``512m``, ``2g``, ``1048576``); ValueError if it is not one."""
    if isinstance(text, int):
        return text
    match = _SIZE.fullmatch(str(text).strip())
    if not match:
        raise ValueError(f"{text!r} is not a size (e.g. 512m, 2g)")
    return int(match[1]) * _UNITS[match[2].lower()]


class SandboxConfig(RuntimeConfig):
    """Keys of the ``sandbox`` tier: nodes under bubblewrap, each in its own namespaces and host uid."""

    type: Literal["sandbox"] = "sandbox"
    network: Literal["none", "egress"] = Field(
        "none",
        description="none: loopback only; egress: outbound connections through pasta, the host unreachable",
    )
    uid_base: int = Field(
        200_000, ge=1000, description="first host uid given to a node (each node has its own)"
    )
    uid_count: int = Field(4096, ge=1, le=1_000_000, description="how many host uids nodes may use")
    workspace_size: str | None = Field(
        "1g", description="size of each node's workspace (a loop-mounted ext4 image); null: no limit"
    )
    cgroup_root: str = Field("/sys/fs/cgroup", description="where the cgroup v1 controllers are mounted")
    template: bool = Field(
        True,
        description="fork each node's server from a process that imported the node's stack once "
        "(fast starts, shared memory); false: every node starts its own interpreter",
    )

    @field_validator("workspace_size")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is not None and parse_size(value) < (16 << 20):
            raise ValueError("workspace_size must be at least 16m")
        return value

    @property
    def workspace_bytes(self) -> int | None:
        return None if self.workspace_size is None else parse_size(self.workspace_size)
