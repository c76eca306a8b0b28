"""The node checker: keeps the records true to what the runtime runs.

Each tick, in one pass: read every node of this manager from the runtime (one ``list`` call, and
what interrupted creates left behind), then the records; mirror status and health into the
records; delete records whose node is gone; remove nodes whose create never finished (their
creating process is gone, or their deadline passed) and finish releases that were cut short;
stop nodes idle for ``node.idling_close_minutes``; release nodes stopped for
``node.idling_release_minutes``; remove runtime nodes that carry this manager's mark but have no
record. What a stop or a removal does is the session service's to decide: the checker calls it.
With an :class:`~toolserver.manager.adoption.Adopter` the loop also renews this manager's lease and,
before each tick, adopts the nodes of replicas whose lease expired; the runtime still marks those
with the manager that made them, so a tick lists every mark its records carry, and a node with no
record of this manager is an orphan only when no replica has a record of it.
An error on one node is logged and the tick goes on; records changing or vanishing under a tick
are no error. The loop runs while its NodeChecker record exists.
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

from toolserver.errors import DatabaseUnavailable, NodeNotFound, RuntimeBackendError, RuntimeUnavailable
from toolserver.manager.activity import ActivityBuffer
from toolserver.manager.adoption import Adopter
from toolserver.manager.lifetime import ASLEEP_STATUSES, idle_limit, lifetime_over, put_to_sleep
from toolserver.manager.models import Ownership, ToolServerNode, utcnow
from toolserver.manager.sessions import SessionService
from toolserver.manager.settings import Settings
from toolserver.manager.store import creator_alive
from toolserver.runtimes.base import NodeInfo
from toolserver.states import STOPPED_STATUSES, NodeStatus

log = logging.getLogger(__name__)

#: A standby checker retries registering every this many ticks (at least 1 s, at most the maximum).
STANDBY_TICKS = 5
STANDBY_MAX_SECONDS = 30.0


@dataclass
class TickReport:
    """What one tick saw and did (for logs, tests and the benchmark)."""

    nodes: int = 0
    updated: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    #: records of creates that never finished, and of releases cut short, removed with their nodes
    removed: list[str] = field(default_factory=list)
    #: runtime nodes (and leftovers of nodes) without a record, removed
    orphans: list[str] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    #: session events the tick saw: (node, kind, detail), kind "died" (the session service records
    #: the closes and releases it is asked for)
    events: list[tuple[ToolServerNode, str, str | None]] = field(default_factory=list)


@dataclass(frozen=True)
class _Action:
    kind: str  # "stop" | "expire" | "release" | "remove" | "remains"
    node: ToolServerNode
    why: str = ""
    #: what the runtime reports of the node, when it does
    info: NodeInfo | None = None


class NodeChecker:
    def __init__(
        self,
        sessions: SessionService,
        *,
        activity: ActivityBuffer | None = None,
        clock: Callable[[], datetime] = utcnow,
        adopter: Adopter | None = None,
    ) -> None:
        self.sessions = sessions
        self.settings = sessions.settings
        self.store = sessions.store
        self.runtime = sessions.runtime
        self.activity = activity
        self.busy = sessions.busy
        self.clock = clock
        self.manager_id = self.settings.manager_id
        self.adopter = adopter
        #: the runtime marks this manager's records carry (its own, and those of adopted nodes)
        self.marks: set[str] = {self.manager_id}
        self.pid = os.getpid()
        self._limit = asyncio.Semaphore(8)
        #: (node, action) pairs whose failure was logged already: said once, not every tick
        self._failing: set[tuple[str, str]] = set()
        self._skipping: str | None = None
        #: when the current tick asked the runtime for its nodes (real time, as the records' writes)
        self._listed_at = utcnow()
        #: awaited with the report of every tick the loop runs (metrics, session events)
        self.on_tick: Callable[[TickReport], Awaitable[None]] | None = None

    # ---- one tick -----------------------------------------------------------------------------------

    async def tick(self) -> TickReport:
        started = time.perf_counter()
        report = TickReport()
        # runtime first, records second: a node that appears in the list always has its record by then
        self._listed_at = utcnow()
        marks = sorted(self.marks)
        lists = await asyncio.gather(
            *(self.runtime.list(m) for m in marks), *(self.runtime.leftovers(m) for m in marks)
        )
        listed = [i for found in lists[: len(marks)] for i in found]
        leftovers = list({i.node_id: i for found in lists[len(marks) :] for i in found}.values())
        infos = {i.node_id: i for i in listed}
        if self.activity is not None:
            await self.activity.flush()
        records = await self.store.list_nodes(self.manager_id)
        report.nodes = len(records)
        unlisted = {n.origin or n.manager_id for n in records} - set(marks)
        self.marks |= unlisted  # listed from the next tick on; until then their records stay as they are
        now = self.clock()
        changes: dict[str, dict[str, Any]] = {}
        actions: list[_Action] = []
        known = set()
        for node in records:
            known.add(node.short_id)
            if node.id in self.busy or (node.origin or node.manager_id) in unlisted:
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
        debris = [i for i in leftovers if i.node_id not in known and i.node_id not in infos]
        if orphans or debris:  # another replica's record (an adopted node, or one of a mark listed here)
            elsewhere = await self.store.existing_short_ids([i.node_id for i in orphans + debris])
            orphans = [i for i in orphans if i.node_id not in elsewhere]
            debris = [i for i in debris if i.node_id not in elsewhere]
        await asyncio.gather(
            *(self._act(action, report) for action in actions),
            *(self._remove_orphan(i, report, listed=True) for i in orphans),
            *(self._remove_orphan(i, report, listed=False) for i in debris),
        )
        report.seconds = time.perf_counter() - started
        return report

    def _plan(
        self,
        node: ToolServerNode,
        info: NodeInfo | None,
        now: datetime,
        changes: dict[str, dict[str, Any]],
        actions: list[_Action],
        report: TickReport,
    ) -> None:
        cfg = self.settings.node
        if node.ownership == Ownership.STARTING:
            # its creator writes it; once that process is gone, or past the deadline, nobody will
            alive = creator_alive(node.creator)
            if alive is False:
                why = "its create was cut short (its process is gone)"
                actions.append(_Action("remove", node, why, info))
            elif node.deadline is None or now >= node.deadline:
                why = "its create did not finish before its deadline"
                actions.append(_Action("remove", node, why, info))
            return
        if node.ownership == Ownership.RELEASING:
            actions.append(_Action("remove", node, "finishing its release", info))
            return
        if info is None:
            if node.status_changed_at >= self._listed_at:
                # its create finished after the runtime was asked (a directory the list had
                # passed): the list cannot say it is gone; the next one will see it
                return
            log.debug("checker: node %s no longer exists; deleting its record", node.short_id)
            report.deleted.append(node.id)
            actions.append(_Action("remains", node, "its node vanished"))
            if not node.pooled:
                report.events.append((node, "died", "the node no longer exists"))
            return
        fields: dict[str, Any] = {}
        # a record changed after the runtime was asked (a pause, a close) is newer than the list
        if info.status != node.status and node.status_changed_at < self._listed_at:
            log.debug("checker: node %s status %s -> %s", node.short_id, node.status, info.status)
            if info.status in STOPPED_STATUSES and node.status not in STOPPED_STATUSES and not node.pooled:
                report.events.append((node, "died", info.detail or f"status {info.status}"))
            fields.update(status=info.status, status_changed_at=now, detail=info.detail)
            node.status_changed_at = now
        elif info.detail and info.detail != node.detail:  # a limit a running node ran into (OOMKilled)
            fields["detail"] = info.detail
        if info.health != node.health:
            fields["health"] = info.health
        if info.running and (info.host, info.port) != (node.ip, node.port):
            fields.update(ip=info.host, port=info.port, runtime_state=info.state)
        if fields:
            changes[node.id] = fields
        if node.ownership == Ownership.POOL:  # a pool node is never idle-closed; a dead one goes at once
            if info.status in STOPPED_STATUSES:
                actions.append(_Action("release", node, "a warm-pool node that stopped"))
            return
        expired = lifetime_over(node, now)
        if expired:
            actions.append(_Action("expire", node, expired))
            return
        if info.status == NodeStatus.RUNNING:
            last = node.last_req_time
            if self.activity is not None:
                last = max(last, self.activity.pending(node.id) or last)
            busy = self.activity is not None and self.activity.in_flight(node.id)
            if not busy and now - last >= idle_limit(node, cfg):
                actions.append(_Action("stop", node))
        elif info.status in ASLEEP_STATUSES and now - node.status_changed_at >= timedelta(
            minutes=cfg.idling_release_minutes
        ):
            since = node.status_changed_at.isoformat(timespec="seconds")
            actions.append(_Action("release", node, f"stopped since {since}Z"))

    async def _act(self, action: _Action, report: TickReport) -> None:
        node = action.node
        async with self._limit:
            try:
                if action.kind == "stop":
                    log.debug("checker: idle node %s, idle since %s", node.short_id, node.last_req_time)
                    await put_to_sleep(self.sessions, node)
                    report.stopped.append(node.id)
                elif action.kind == "expire":
                    if await self.sessions.remove(node, action.why, event="expired"):
                        report.released.append(node.id)
                elif action.kind == "release":
                    if await self.sessions.remove(node, action.why):
                        report.released.append(node.id)
                elif action.kind == "remove":
                    log.info("checker: removing node %s: %s", node.short_id, action.why)
                    state = action.info.state if action.info else None
                    if await self.sessions.remove(node, action.why, state):
                        report.removed.append(node.id)
                else:  # "remains": the record is already deleted; remove what the node left behind
                    await self.sessions.remove_remains(node.runtime_state, node.short_id, action.why)
                self._failing.discard((node.id, action.kind))
            except RuntimeBackendError as exc:
                report.errors += 1
                self._failed(
                    (node.id, action.kind), f"checker: could not {action.kind} node {node.short_id}: {exc}"
                )
            except Exception:
                report.errors += 1
                log.exception("checker: could not %s node %s", action.kind, node.short_id)

    async def _remove_orphan(self, info: NodeInfo, report: TickReport, listed: bool) -> None:
        """Remove a node (``listed``) or the leftovers of one that has no record.

        A listed node is looked at once more first: one released between the runtime's list and
        the records' read has no record either, and is gone already.
        """
        async with self._limit:
            try:
                if listed:
                    try:
                        await self.runtime.inspect(info.state)
                    except NodeNotFound:
                        return
                log.warning("checker: removing orphan node %s (no record)", info.node_id)
                await self.sessions.remove_remains(info.state, info.node_id, "no record")
                report.orphans.append(info.node_id)
                self._failing.discard((info.node_id, "orphan"))
            except RuntimeBackendError as exc:
                report.errors += 1
                self._failed(
                    (info.node_id, "orphan"), f"checker: could not remove orphan {info.node_id}: {exc}"
                )
            except Exception:
                report.errors += 1
                log.exception("checker: could not remove orphan %s", info.node_id)

    def _failed(self, key: tuple[str, str], message: str) -> None:
        """Log a runtime failure the first time it happens to a node, not on every tick."""
        if key not in self._failing:
            self._failing.add(key)
            log.warning(message)
        else:
            log.debug(message)

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
        renewals = None
        if self.adopter is not None:
            renewals = asyncio.create_task(self.adopter.keep_alive(interval), name="lease-renewal")
        try:
            await self._loop(interval)
        finally:
            if renewals is not None:
                renewals.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewals

    async def _loop(self, interval: float) -> None:
        while True:
            try:
                if not await self.store.heartbeat_checker(self.manager_id, self.pid):
                    log.info("checker: NodeChecker record deleted; stopping")
                    return
                if self.adopter is not None:
                    for adopted in await self.adopter.adopt_expired():
                        self.marks |= adopted.origins
                    await self.adopter.prune()
                report = await self.tick()  # each error is logged where it happens
                if self.on_tick is not None:
                    await self.on_tick(report)
                if self._skipping is not None:
                    log.info("checker: ticking again after the %s", self._skipping)
                    self._skipping = None
            except asyncio.CancelledError:
                raise
            except (DatabaseUnavailable, RuntimeUnavailable) as exc:
                what = "database outage" if isinstance(exc, DatabaseUnavailable) else "runtime outage"
                if self._skipping is None:
                    log.warning("checker: skipping ticks during the %s (%s)", what, exc)
                self._skipping = what
            except Exception:
                log.exception("checker: tick failed")
                if self.on_tick is not None:
                    with contextlib.suppress(Exception):
                        await self.on_tick(TickReport(errors=1))
            await asyncio.sleep(interval)


def run_standalone(settings: Settings) -> int:
    """``toolserver checker``: the same loop, in its own process."""
    from toolserver.logs import configure_logging
    from toolserver.manager.adoption import cluster_adopter
    from toolserver.manager.events import SessionEvents, tick_observer
    from toolserver.manager.store import open_store
    from toolserver.runtimes import create_runtime

    configure_logging("info", settings.log_format)

    async def main() -> int:
        store = await open_store(settings.database_url)
        runtime = create_runtime(settings.runtime_config, settings.runtime_context())
        events = SessionEvents(store, lambda owner: owner or "-")
        from toolserver.manager.app import start_webhooks

        webhooks = start_webhooks(settings, events)
        sessions = SessionService(settings, store, runtime, ActivityBuffer(store), events=events)
        checker = NodeChecker(sessions, adopter=cluster_adopter(settings, store, sessions.creator))
        checker.on_tick = tick_observer(events)
        # signals are handled from the start: a SIGTERM that comes while the record is being
        # written must still end with the record deleted (unregister only deletes this pid's)
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            if not await checker.register():
                log.error("a checker for manager %s is already running", settings.manager_id)
                return 1
            await checker.run()
        except asyncio.CancelledError:
            log.info("checker: stopping on signal")
        finally:
            try:
                await checker.unregister()
            finally:
                if webhooks is not None:
                    await webhooks.aclose()
                await runtime.aclose()
                await store.aclose()
        return 0

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        return 0
