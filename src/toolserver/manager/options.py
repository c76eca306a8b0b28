"""Session options against the operator's maximums: what a ``/get_cookie`` body may ask for.

:class:`~toolserver.protocol.SessionOptions` checks the shape (unknown keys, types); this module
checks the values against ``sessions.*`` and the runtime's capabilities, raising
:class:`~toolserver.errors.InvalidRequest` (422) naming the key, and turns them into what the
record and the runtime get: an expiry, an idle limit, a :class:`NodeSpec`'s env, resources and
network.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from toolserver.errors import ConfigError, InvalidRequest
from toolserver.manager.models import utcnow
from toolserver.manager.settings import Settings
from toolserver.protocol import SessionOptions
from toolserver.runtimes.base import ResourceLimits, Runtime
from toolserver.runtimes.docker_config import parse_size


def check_options(options: SessionOptions, settings: Settings, runtime: Runtime) -> None:
    """InvalidRequest naming the first option above its maximum or not available on this manager."""
    limits = settings.sessions
    if options.isolation is not None and options.isolation != runtime.name:
        raise InvalidRequest(
            f"'isolation': this manager runs {runtime.name!r} nodes only (asked for {options.isolation!r})"
        )
    if options.timeout_seconds is not None and options.timeout_seconds > limits.max_timeout_seconds:
        raise InvalidRequest(
            f"'timeout_seconds': {options.timeout_seconds:g} is above the maximum "
            f"{limits.max_timeout_seconds:g} (sessions.max_timeout_seconds)"
        )
    if options.idle_seconds is not None and options.idle_seconds > limits.max_idle_seconds:
        raise InvalidRequest(
            f"'idle_seconds': {options.idle_seconds:g} is above the maximum "
            f"{limits.max_idle_seconds:g} (sessions.max_idle_seconds)"
        )
    if options.resources is not None:
        _check_resources(options, settings, runtime)
    if options.network is not None:
        if "network" not in runtime.capabilities:
            raise InvalidRequest(f"'network': the {runtime.name} runtime cannot put a node on a network")
        if options.network not in limits.networks:
            allowed = ", ".join(limits.networks) or "none"
            raise InvalidRequest(
                f"'network': {options.network!r} is not one of sessions.networks (allowed: {allowed})"
            )


def _check_resources(options: SessionOptions, settings: Settings, runtime: Runtime) -> None:
    asked = options.resources
    assert asked is not None
    if "resources" not in runtime.capabilities:
        raise InvalidRequest(f"'resources': the {runtime.name} runtime cannot enforce resource limits")
    top = settings.sessions.max_resources
    if asked.memory is not None:
        try:
            memory = parse_size(asked.memory, "resources.memory")
        except ConfigError as exc:
            raise InvalidRequest(str(exc)) from None
        if top.memory is not None and memory > parse_size(top.memory, "sessions.max_resources.memory"):
            raise InvalidRequest(
                f"'resources.memory': {asked.memory} is above the maximum {top.memory} "
                "(sessions.max_resources.memory)"
            )
    if asked.cpus is not None and top.cpus is not None and asked.cpus > top.cpus:
        raise InvalidRequest(
            f"'resources.cpus': {asked.cpus:g} is above the maximum {top.cpus:g} "
            "(sessions.max_resources.cpus)"
        )
    if asked.pids_limit is not None and top.pids_limit is not None and asked.pids_limit > top.pids_limit:
        raise InvalidRequest(
            f"'resources.pids_limit': {asked.pids_limit} is above the maximum {top.pids_limit} "
            "(sessions.max_resources.pids_limit)"
        )


def node_resources(options: SessionOptions, settings: Settings) -> ResourceLimits | None:
    """The node's limits: ``node.resources`` with the session's own over them (None: no change)."""
    if options.resources is None:
        return None
    asked = options.resources.model_dump(exclude_none=True)
    return settings.node.resources.model_copy(update=asked)


def expiry(settings: Settings, timeout_seconds: float | None, now: datetime | None = None) -> datetime | None:
    """When a session asking for ``timeout_seconds`` expires (the manager's default when None)."""
    seconds = timeout_seconds or settings.sessions.default_timeout_seconds
    return (now or utcnow()) + timedelta(seconds=seconds) if seconds else None


def check_timeout(settings: Settings, timeout_seconds: float) -> None:
    """InvalidRequest when an extension asks for more than sessions.max_timeout_seconds."""
    top = settings.sessions.max_timeout_seconds
    if timeout_seconds > top:
        raise InvalidRequest(
            f"'timeout_seconds': {timeout_seconds:g} is above the maximum {top:g} "
            "(sessions.max_timeout_seconds)"
        )


def expires_text(at: datetime | None) -> str | None:
    """An expiry as the answers carry it: ISO 8601 UTC with ``Z``, seconds precision."""
    return at.isoformat(timespec="seconds") + "Z" if at is not None else None
