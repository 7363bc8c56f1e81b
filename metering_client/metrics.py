"""The agent's own Prometheus metrics: read from the lease keeper at scrape time.

Nothing here is counted on the hot path: every figure is the keeper's own state (held
leases, the current server, failovers, connection attempts) turned into metric families
when Prometheus asks, so a scrape always agrees with `metering-client status`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from metering_runtime.http import Response

Gauges = Callable[[], list[tuple[str, str, float]]]


class AgentCollector:
    def __init__(
        self,
        status: Callable[[], dict[str, Any]],
        local_sessions: Callable[[], int],
        extra: Gauges | None = None,
    ):
        self.status = status
        self.local_sessions = local_sessions
        self._extra = extra

    def collect(self) -> Iterator[Metric]:
        s = self.status()
        held = GaugeMetricFamily(
            "metering_agent_leases_held", "Seats this agent holds for local programs"
        )
        held.add_metric([], len(s["held"]))
        yield held
        server = GaugeMetricFamily(
            "metering_agent_connected",
            "1 while connected to a server (label: which one)",
            labels=["server"],
        )
        server.add_metric([s["server"] or ""], 1 if s["connected"] else 0)
        yield server
        failovers = CounterMetricFamily(
            "metering_agent_failovers", "Moves to another server after a server failed"
        )
        failovers.add_metric([], s["failovers"])
        yield failovers
        attempts = CounterMetricFamily(
            "metering_agent_connection_attempts", "Connections tried to servers (reconnects)"
        )
        attempts.add_metric([], s["connection_attempts"])
        yield attempts
        local = GaugeMetricFamily(
            "metering_agent_local_sessions", "Programs connected to the agent's socket"
        )
        local.add_metric([], self.local_sessions())
        yield local
        for name, doc, value in self.extra():
            family = GaugeMetricFamily(name, doc)
            family.add_metric([], value)
            yield family

    def extra(self) -> list[tuple[str, str, float]]:
        """Further gauges (name, help, value) other parts of the agent add (the spool)."""
        return self._extra() if self._extra is not None else []


class AgentMetrics:
    def __init__(
        self,
        status: Callable[[], dict[str, Any]],
        local_sessions: Callable[[], int],
        extra: Gauges | None = None,
    ):
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = AgentCollector(status, local_sessions, extra)
        self.registry.register(self.collector)  # type: ignore[arg-type]

    async def scrape(self) -> Response:
        return Response(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
