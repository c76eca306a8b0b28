"""Docker Engine API answers → :class:`NodeInfo` (pure functions, no I/O).

Two sources: ``GET /containers/{id}/json`` (inspect: ``State.Status``, ``State.Health.Status``,
exit code, OOMKilled) and ``GET /containers/json`` (list: ``State`` plus the human ``Status`` text
such as ``Up 5 seconds (healthy)`` or ``Exited (137) 2 seconds ago``, from which health and exit
code are read, and ``Ports``). Both give the same NodeInfo for the same container, except that
only inspect knows about OOMKilled.
"""

from __future__ import annotations

import re
from typing import Any

from toolserver.runtimes.base import (
    CREATED,
    HEALTHY,
    LABEL_MANAGER,
    LABEL_NODE,
    RUNNING,
    STARTING,
    UNHEALTHY,
    UNKNOWN_HEALTH,
    NodeInfo,
)
from toolserver.runtimes.docker_config import LABEL_VOLUME, volume_name

_EXITED_TEXT = re.compile(r"^Exited \((-?\d+)\)")
#: Statuses whose Docker health is meaningful; any other (exited, dead) reports unhealthy.
_LIVE = {RUNNING, "restarting", "paused"}


def health_from_status_text(text: str) -> str:
    """Health from the list's Status text: ``(healthy)``, ``(health: starting)``, ``(unhealthy)``."""
    if "(healthy)" in text:
        return HEALTHY
    if "(health: starting)" in text:
        return STARTING
    if "(unhealthy)" in text:
        return UNHEALTHY
    return UNKNOWN_HEALTH


def exit_code_from_status_text(text: str) -> int | None:
    match = _EXITED_TEXT.match(text)
    return int(match.group(1)) if match else None


def _health(status: str, docker_health: str) -> str:
    if status in _LIVE:
        return docker_health
    if status == CREATED:
        return UNKNOWN_HEALTH
    return UNHEALTHY


def _detail(status: str, exit_code: int | None, oom: bool = False, error: str = "") -> str | None:
    if status in _LIVE or status == CREATED:
        return None
    parts = []
    if exit_code is not None:
        parts.append(f"exit code {exit_code}")
        if exit_code == 137 and not oom:
            parts.append("killed (SIGKILL)")
    if oom:
        parts.append("OOMKilled: the node went over its memory limit")
    if error:
        parts.append(error)
    return "; ".join(parts) or None


def _state(container_id: str, name: str, labels: dict[str, str]) -> dict[str, Any]:
    node_id = labels.get(LABEL_NODE, "")
    return {
        "container_id": container_id,
        "container": name,
        "volume": labels.get(LABEL_VOLUME) or (volume_name(node_id) if node_id else ""),
        "node_id": node_id,
        "manager_id": labels.get(LABEL_MANAGER, ""),
    }


def _network_host(networks: dict[str, Any], network: str | None, name: str) -> str:
    """The node's IP on ``network`` (or its only network), else its name (DNS on user networks)."""
    entry = networks.get(network or "") or (next(iter(networks.values())) if len(networks) == 1 else None)
    ip = (entry or {}).get("IPAddress") or ""
    return ip or name


def from_inspect(data: dict[str, Any], *, address_mode: str, network: str | None, port: int) -> NodeInfo:
    """NodeInfo from ``GET /containers/{id}/json``."""
    labels = (data.get("Config") or {}).get("Labels") or {}
    st = data.get("State") or {}
    status = st.get("Status") or "unknown"
    docker_health = ((st.get("Health") or {}).get("Status")) or UNKNOWN_HEALTH
    name = str(data.get("Name") or "").lstrip("/")
    net = data.get("NetworkSettings") or {}
    if address_mode == "published":
        host, node_port = "127.0.0.1", 0
        for binding in (net.get("Ports") or {}).get(f"{port}/tcp") or []:
            if binding.get("HostIp") in ("127.0.0.1", "0.0.0.0", "") and binding.get("HostPort"):
                node_port = int(binding["HostPort"])
                break
    else:
        host, node_port = _network_host(net.get("Networks") or {}, network, name), port
    exit_code = st.get("ExitCode") if status not in _LIVE and status != CREATED else None
    return NodeInfo(
        node_id=labels.get(LABEL_NODE, ""),
        manager_id=labels.get(LABEL_MANAGER, ""),
        status=status,
        health=_health(status, docker_health),
        host=host,
        port=node_port,
        state=_state(str(data.get("Id", "")), name, labels),
        detail=_detail(status, exit_code, bool(st.get("OOMKilled")), str(st.get("Error") or "")),
    )


def from_list_entry(entry: dict[str, Any], *, address_mode: str, network: str | None, port: int) -> NodeInfo:
    """NodeInfo from one item of ``GET /containers/json``."""
    labels = entry.get("Labels") or {}
    status = str(entry.get("State") or "unknown")
    text = str(entry.get("Status") or "")
    names = entry.get("Names") or [""]
    name = str(names[0]).lstrip("/")
    if address_mode == "published":
        host, node_port = "127.0.0.1", 0
        for p in entry.get("Ports") or []:
            public = p.get("PublicPort")
            if p.get("PrivatePort") == port and public and p.get("IP") in ("127.0.0.1", "0.0.0.0", None):
                node_port = int(public)
                break
    else:
        networks = (entry.get("NetworkSettings") or {}).get("Networks") or {}
        host, node_port = _network_host(networks, network, name), port
    return NodeInfo(
        node_id=labels.get(LABEL_NODE, ""),
        manager_id=labels.get(LABEL_MANAGER, ""),
        status=status,
        health=_health(status, health_from_status_text(text)),
        host=host,
        port=node_port,
        state=_state(str(entry.get("Id", "")), name, labels),
        detail=_detail(status, exit_code_from_status_text(text)),
    )
