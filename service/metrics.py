"""Prometheus metrics: request latency (middleware), jobs by status and stage durations (read
from the job store at scrape time, so every API replica reports the same numbers)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily


class JobCollector:
    def __init__(self, store):
        self.store = store

    def collect(self):
        jobs = GaugeMetricFamily("otfuse_jobs", "jobs in the store by status", labels=["status"])
        stages = HistogramMetricFamily(
            "otfuse_stage_duration_seconds", "job stage durations", labels=["stage"]
        )
        try:
            counts, stats = self.store.counts(), self.store.stage_stats()
        except Exception:  # a scrape must not fail because the store is down
            counts, stats = {}, {}
        for status, count in counts.items():
            jobs.add_metric([status], count)
        for stage, s in sorted(stats.items()):
            buckets = [(_le(le), n) for le, n in sorted(s["buckets"].items())]
            stages.add_metric([stage], buckets, s["sum"])
        yield jobs
        yield stages


def _le(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(float(value))


class Metrics:
    def __init__(self, store):
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "otfuse_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route", "status"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.registry.register(JobCollector(store))


class LatencyMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware overhead); the route label is the path template."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics
        self._children: dict[tuple, object] = {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = [500]

        async def capture(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send=capture)
        finally:
            key = (scope["method"], getattr(scope.get("route"), "path", "unmatched"), status[0])
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self.metrics.latency.labels(*key[:2], str(key[2]))
            child.observe(time.perf_counter() - started)
