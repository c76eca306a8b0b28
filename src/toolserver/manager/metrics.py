"""The manager's Prometheus metrics (``GET /metrics``, or ``metrics_listen`` without a key).

Each app has its own registry. Counters and histograms are updated where things happen; the
record counts (sessions by status and owner, pool nodes) are read from the database when
scraped. The proxy's hot path costs a dictionary lookup and three updates of children created
once per (route, status).

=====================================  =========================================================
``toolserver_sessions``                sessions by ``status`` and ``owner`` (key name), gauge
``toolserver_pool_nodes``              warm-pool nodes by ``state`` (ready, starting) and the
                                       ``target``, gauge
``toolserver_session_starts_total``    new sessions by ``source`` (cold, pool)
``toolserver_session_start_seconds``   how long they took, by ``source`` (histogram)
``toolserver_pool_misses_total``       new sessions that found the warm pool empty
``toolserver_proxy_requests_total``    forwarded requests by ``route`` and ``status``
``toolserver_proxy_request_seconds``   until the node's answer starts, by ``route`` (histogram)
``toolserver_proxy_bytes_total``       bytes streamed, by ``direction`` (to_node, from_node)
``toolserver_checker_tick_seconds``    checker tick duration (histogram)
``toolserver_checker_errors_total``    errors in checker ticks
``toolserver_runtime_errors_total``    runtime errors by ``kind``
``toolserver_quota_refusals_total``    refused new sessions by ``quota`` (max_sessions,
                                       starts_per_minute, max_nodes)
``toolserver_auth_failures_total``     requests refused for their API key (401)
``toolserver_draining``                1 while the manager takes no new sessions
``toolserver_wake_seconds``            wakes on request, by ``kind`` (resumed, restarted), histogram
``toolserver_webhook_failures_total``  webhook deliveries that failed (each is retried)
=====================================  =========================================================
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from toolserver.manager.models import STOPPED_STATUSES

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

START_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
PROXY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 600.0)


class Metrics:
    def __init__(self) -> None:
        disable_created_metrics()  # no "_created" twin of every counter: half the text, nothing lost
        r = self.registry = CollectorRegistry()
        self.sessions = Gauge(
            "toolserver_sessions", "Sessions by status and owner", ["status", "owner"], registry=r
        )
        self.pool_nodes = Gauge("toolserver_pool_nodes", "Warm-pool nodes by state", ["state"], registry=r)
        self.session_starts = Counter(
            "toolserver_session_starts", "New sessions by source", ["source"], registry=r
        )
        self.session_start_seconds = Histogram(
            "toolserver_session_start_seconds",
            "Time to a ready node for a new session",
            ["source"],
            buckets=START_BUCKETS,
            registry=r,
        )
        self.wake_seconds = Histogram(
            "toolserver_wake_seconds", "Wakes on request", ["kind"], buckets=START_BUCKETS, registry=r
        )
        self.webhook_failures = Counter(
            "toolserver_webhook_failures", "Failed webhook deliveries (retried)", registry=r
        )
        self.pool_misses = Counter(
            "toolserver_pool_misses", "New sessions that found the pool empty", registry=r
        )
        self.proxy_requests = Counter(
            "toolserver_proxy_requests", "Forwarded requests", ["route", "status"], registry=r
        )
        self.proxy_seconds = Histogram(
            "toolserver_proxy_request_seconds",
            "Time until the node's answer starts",
            ["route"],
            buckets=PROXY_BUCKETS,
            registry=r,
        )
        self.proxy_bytes = Counter("toolserver_proxy_bytes", "Bytes streamed", ["direction"], registry=r)
        self.checker_tick_seconds = Histogram(
            "toolserver_checker_tick_seconds",
            "Checker tick duration",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r,
        )
        self.checker_errors = Counter("toolserver_checker_errors", "Errors in checker ticks", registry=r)
        self.runtime_errors = Counter(
            "toolserver_runtime_errors", "Runtime errors by kind", ["kind"], registry=r
        )
        self.quota_refusals = Counter(
            "toolserver_quota_refusals", "New sessions refused by a quota", ["quota"], registry=r
        )
        self.auth_failures = Counter(
            "toolserver_auth_failures", "Requests refused for their API key", registry=r
        )
        self.draining = Gauge("toolserver_draining", "1 while no new sessions are taken", registry=r)
        self._to_node = self.proxy_bytes.labels("to_node")
        self._from_node = self.proxy_bytes.labels("from_node")
        self._proxy: dict[tuple[str, int], tuple[Any, Any]] = {}

    def proxied(self, route: str, status: int, seconds: float, sent: int, received: int) -> None:
        """One forwarded request: its route, the node's status, time to the answer's start, bytes."""
        children = self._proxy.get((route, status))
        if children is None:
            children = self.proxy_requests.labels(route, str(status)), self.proxy_seconds.labels(route)
            self._proxy[(route, status)] = children
        children[0].inc()
        children[1].observe(seconds)
        if sent:
            self._to_node.inc(sent)
        if received:
            self._from_node.inc(received)

    def session_started(self, source: str, seconds: float) -> None:
        self.session_starts.labels(source).inc()
        self.session_start_seconds.labels(source).observe(seconds)

    def render(
        self, counts: list[tuple[str | None, str, bool, int]], names: dict[str, str], pool_target: int
    ) -> bytes:
        """The text exposition, with the record counts ``(owner, status, pooled, n)`` read just now."""
        self.sessions.clear()
        ready = starting = 0
        for owner, status, pooled, n in counts:
            if pooled:
                if status == "running":
                    ready += n
                elif status not in STOPPED_STATUSES:
                    starting += n
                continue
            self.sessions.labels(status, names.get(owner, owner) if owner else "-").inc(n)
        self.pool_nodes.labels("ready").set(ready)
        self.pool_nodes.labels("starting").set(starting)
        self.pool_nodes.labels("target").set(pool_target)
        return generate_latest(self.registry)
