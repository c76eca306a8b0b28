"""The node checker: keeps the records true to what the runtime runs.

Each tick, in one pass: read every node of this manager from the runtime (one ``list`` call), then
the records; mirror status and health into the records; delete records whose node is gone; stop
nodes idle for ``node.idling_close_minutes``; release nodes stopped for ``node.idling_release_minutes``;
remove runtime nodes that carry this manager's mark but have no record. An error on one node is
logged and the tick goes on. The loop runs while its NodeChecker record exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from toolserver.errors import DatabaseUnavailable, NodeNotFound
from toolserver.manager.activity import ActivityBuffer
from toolserver.manager.models import STATUS_CREATED, STOPPED_STATUSES, ToolServerNode, utcnow
from toolserver.manager.settings import Settings
from toolserver.manager.store import Store
from toolserver.runtimes.base import CREATED, RUNNING, NodeInfo, Runtime

log = logging.getLogger(__name__)

#: A standby checker retries registering every this many ticks (at least 1 s, at most the maximum).
STANDBY_TICKS = 5
STANDBY_MAX_SECONDS = 30.0
#: Record statuses of a node between its insert and its first start (the seed's default, the runtime's word).
NOT_STARTED = frozenset({STATUS_CREATED, CREATED})


@dataclass
class TickReport:
    """What one tick saw and did (for logs, tests and the benchmark)."""

    nodes: int = 0
    updated: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    #: session events seen or caused: (node, kind, detail), kind "died", "closed" or "released"
    events: list[tuple[ToolServerNode, str, str | None]] = field(default_factory=list)


class NodeChecker:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        runtime: Runtime,
        *,
        activity: ActivityBuffer | None = None,
        busy: set[str] | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self.store = store
        self.runtime = runtime
        self.activity = activity
        self.busy = busy if busy is not None else set()
        self.clock = clock
        self.manager_id = settings.manager_id
        self.pid = os.getpid()
        self._limit = asyncio.Semaphore(8)
        #: awaited with the report of every tick the loop runs (metrics, session events)
        self.on_tick: Callable[[TickReport], Awaitable[None]] | None = None

    # ---- one tick -----------------------------------------------------------------------------------

    async def tick(self) -> TickReport:
        started = time.perf_counter()
        report = TickReport()
        # runtime first, records second: a node that appears in the list always has its record by then
        infos = {i.node_id: i for i in await self.runtime.list(self.manager_id)}
        if self.activity is not None:
            await self.activity.flush()
        records = await self.store.list_nodes(self.manager_id)
        report.nodes = len(records)
        now = self.clock()
        changes: dict[str, dict[str, Any]] = {}
        actions: list[tuple[str, ToolServerNode]] = []
        known = set()
        for node in records:
            known.add(node.short_id)
            if node.id in self.busy:
                continue
            try:
                self._plan(node, infos.get(node.short_id), now, changes, actions, report)
            except Exception:
                report.errors += 1
                log.exception("checker: node %s", node.short_id)
        if changes:
            await self.store.update_nodes(changes)
            report.updated = [n for n in changes if n not in report.deleted]
        if report.deleted:
            await self.store.delete_nodes(report.deleted)
        orphans = [i for sid, i in infos.items() if sid not in known]
        await asyncio.gather(
            *(self._act(kind, node, report) for kind, node in actions),
            *(self._remove_orphan(i, report) for i in orphans),
        )
        report.seconds = time.perf_counter() - started
        return report

    def _plan(
        self,
        node: ToolServerNode,
        info: NodeInfo | None,
        now: datetime,
        changes: dict[str, dict[str, Any]],
        actions: list[tuple[str, ToolServerNode]],
        report: TickReport,
    ) -> None:
        cfg = self.settings.node
        if info is None:
            # A node another manager process is creating right now may be missing from the list
            # taken a moment ago while its record already exists: leave young, never-started nodes be.
            starting = node.status in NOT_STARTED and now - node.created_at < timedelta(
                seconds=cfg.creation_wait_seconds
            )
            if not starting:
                log.debug("checker: node %s no longer exists; deleting its record", node.short_id)
                report.deleted.append(node.id)
                actions.append(("cleanup", node))
                if not node.pooled:
                    report.events.append((node, "died", "the node no longer exists"))
            return
        fields: dict[str, Any] = {}
        if info.status != node.status:
            log.debug("checker: node %s status %s -> %s", node.short_id, node.status, info.status)
            if info.status in STOPPED_STATUSES and node.status not in STOPPED_STATUSES and not node.pooled:
                report.events.append((node, "died", info.detail or f"status {info.status}"))
            fields.update(status=info.status, status_changed_at=now, detail=info.detail)
            node.status_changed_at = now
        if info.health != node.health:
            fields["health"] = info.health
        if info.running and (info.host, info.port) != (node.ip, node.port):
            fields.update(ip=info.host, port=info.port, runtime_state=info.state)
        if fields:
            changes[node.id] = fields
        if node.pooled:  # a pool node is never idle-closed; a dead one is released at once
            if info.status in STOPPED_STATUSES:
                actions.append(("release", node))
            return
        if info.status == RUNNING:
            last = node.last_req_time
            if self.activity is not None:
                last = max(last, self.activity.pending(node.id) or last)
            if now - last >= timedelta(minutes=cfg.idling_close_minutes):
                actions.append(("stop", node))
        elif info.status in STOPPED_STATUSES and now - node.status_changed_at >= timedelta(
            minutes=cfg.idling_release_minutes
        ):
            actions.append(("release", node))

    async def _act(self, kind: str, node: ToolServerNode, report: TickReport) -> None:
        async with self._limit:
            try:
                if kind == "stop":
                    log.debug("checker: stopping node %s, idle since %s", node.short_id, node.last_req_time)
                    await self.runtime.stop(node.runtime_state, self.settings.node.stop_grace_seconds)
                    await self.store.update_node(
                        node.id,
                        status="exited",
                        health="unhealthy",
                        status_changed_at=self.clock(),
                        detail="stopped: idle",
                    )
                    report.stopped.append(node.id)
                    idle = self.settings.node.idling_close_minutes
                    report.events.append(
                        (node, "closed", f"idle for {idle:g} min (node.idling_close_minutes)")
                    )
                elif kind == "release":
                    log.debug(
                        "checker: releasing node %s, stopped since %s", node.short_id, node.status_changed_at
                    )
                    with contextlib.suppress(NodeNotFound):
                        await self.runtime.remove(node.runtime_state)
                    await self.store.delete_nodes([node.id])
                    report.released.append(node.id)
                    if not node.pooled:
                        since = node.status_changed_at.isoformat(timespec="seconds")
                        report.events.append((node, "released", f"stopped since {since}Z"))
                else:  # "cleanup": the record is already deleted; remove what the node left behind
                    with contextlib.suppress(NodeNotFound):
                        await self.runtime.remove(node.runtime_state)
            except Exception:
                report.errors += 1
                log.exception("checker: could not %s node %s", kind, node.short_id)

    async def _remove_orphan(self, info: NodeInfo, report: TickReport) -> None:
        async with self._limit:
            try:
                log.warning("checker: removing orphan node %s (no record)", info.node_id)
                with contextlib.suppress(NodeNotFound):
                    await self.runtime.remove(info.state)
                report.orphans.append(info.node_id)
            except Exception:
                report.errors += 1
                log.exception("checker: could not remove orphan %s", info.node_id)

    # ---- the loop -----------------------------------------------------------------------------------

    async def register(self) -> bool:
        """Clean stale checker records, then register this one. False when another live checker runs."""
        interval = self.settings.node.health_check_interval
        stale = await self.store.delete_stale_checkers(stale_after=max(30.0, 10 * interval))
        for manager_id in stale:
            log.info("checker: deleted stale NodeChecker record of manager %s", manager_id)
        return await self.store.register_checker(self.manager_id, self.pid, interval)

    async def unregister(self) -> None:
        await self.store.delete_checker(self.manager_id, self.pid)

    async def stand_by(self) -> None:
        """Retry registering every few ticks; run the loop once this process holds the record.

        Several manager processes may share one manager id (workers on one database): one checks,
        the others stand by, and one of them takes over within seconds when the checking process
        dies (:meth:`register` deletes its stale record on the way).
        """
        retry = min(STANDBY_MAX_SECONDS, max(1.0, STANDBY_TICKS * self.settings.node.health_check_interval))
        log.info("checker: another process checks for manager %s; standing by", self.manager_id)
        while not await self.register():
            await asyncio.sleep(retry)
        log.info("checker: taking over for manager %s", self.manager_id)
        await self.run()

    async def run(self) -> None:
        """Tick every ``node.health_check_interval`` seconds until the NodeChecker record is deleted."""
        interval = self.settings.node.health_check_interval
        log.info("checker: started for manager %s (every %g s)", self.manager_id, interval)
        while True:
            try:
                if not await self.store.heartbeat_checker(self.manager_id, self.pid):
                    log.info("checker: NodeChecker record deleted; stopping")
                    return
                report = await self.tick()
                if report.errors:
                    log.warning("checker: tick had %d errors", report.errors)
                if self.on_tick is not None:
                    await self.on_tick(report)
            except asyncio.CancelledError:
                raise
            except DatabaseUnavailable as exc:
                log.warning("checker: tick skipped (%s)", exc)
            except Exception:
                log.exception("checker: tick failed")
                if self.on_tick is not None:
                    with contextlib.suppress(Exception):
                        await self.on_tick(TickReport(errors=1))
            await asyncio.sleep(interval)


def run_standalone(settings: Settings) -> int:
    """``toolserver checker``: the same loop, in its own process."""
    from toolserver.logs import configure_logging
    from toolserver.manager.events import SessionEvents, tick_observer
    from toolserver.manager.store import open_store
    from toolserver.runtimes import create_runtime

    configure_logging("info", settings.log_format)

    async def main() -> int:
        store = await open_store(settings.database_url)
        runtime = create_runtime(settings.runtime_config, settings.runtime_context())
        checker = NodeChecker(settings, store, runtime)
        checker.on_tick = tick_observer(SessionEvents(store, lambda owner: owner or "-"))
        try:
            if not await checker.register():
                log.error("a checker for manager %s is already running", settings.manager_id)
                return 1
            loop = asyncio.get_running_loop()
            task = asyncio.current_task()
            assert task is not None
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, task.cancel)
            try:
                await checker.run()
            except asyncio.CancelledError:
                log.info("checker: stopping on signal")
            finally:
                await checker.unregister()
        finally:
            await runtime.aclose()
            await store.aclose()
        return 0

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        return 0
