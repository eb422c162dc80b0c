"""Prometheus metrics shared by all worker processes.

With several web/worker processes, `prometheus_client` aggregates through files
in `PROMETHEUS_MULTIPROC_DIR` (set by `make web`/`make run` and the test
server; prometheus_client reads the variable itself when a metric is made, the
setting carries the same value); without it (a single process) the default
registry is used. Values
that live in Redis (queue depth, breaker states) are read at scrape time by a
collector, so every process reports the same shared number.
"""

import os
import time
from collections.abc import Callable, Iterable

import psutil
from django.conf import settings
from django.http import HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

HTTP_REQUESTS = Counter("iot_http_requests_total", "HTTP requests served.", ["method", "route", "status"])
HTTP_LATENCY = Histogram(
    "iot_http_request_duration_seconds",
    "HTTP request latency.",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
PROCESS_RSS = Gauge(
    "iot_process_resident_memory_bytes", "Resident memory of each server process.", ["pid"], multiprocess_mode="all"
)

# Gauges whose value lives in Redis/Postgres: name -> (help, reader returning {labels-tuple: value}).
_shared_gauges: dict[str, tuple[str, list[str], Callable[[], dict[tuple[str, ...], float]]]] = {}


def register_shared_gauge(
    name: str, documentation: str, labels: list[str], read: Callable[[], dict[tuple[str, ...], float]]
) -> None:
    """Expose a gauge computed at scrape time (e.g. a Redis stream's length)."""
    _shared_gauges[name] = (documentation, labels, read)


# Counters kept in Redis, so the ones Celery workers count (they serve no /metrics, and may run with no
# multiprocess directory or on other hosts) reach the web's scrape too. Exposed as `<name>_total`.
_shared_counters: dict[str, tuple[str, list[str], Callable[[], dict[tuple[str, ...], float]]]] = {}


def register_shared_counter(
    name: str, documentation: str, labels: list[str], read: Callable[[], dict[tuple[str, ...], float]]
) -> None:
    """Expose a counter read at scrape time from shared storage (e.g. a Redis hash every process increments)."""
    _shared_counters[name] = (documentation, labels, read)


class _SharedStateCollector(Collector):
    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        for kind, registered in ((GaugeMetricFamily, _shared_gauges), (CounterMetricFamily, _shared_counters)):
            for name, (documentation, labels, read) in registered.items():
                family = kind(name, documentation, labels=labels)
                try:
                    values = read()
                except Exception:  # a scrape must not fail because a backend is down
                    values = {}
                for label_values, value in values.items():
                    family.add_metric(list(label_values), value)
                yield family


def _registry() -> CollectorRegistry:
    if settings.PROMETHEUS_MULTIPROC_DIR:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = CollectorRegistry()
        for collector in list(REGISTRY._collector_to_names):
            registry.register(collector)
    registry.register(_SharedStateCollector())
    return registry


_RSS_REFRESH_SECONDS = 5.0
_rss_refreshed_at = 0.0


def _refresh_process_rss() -> None:
    global _rss_refreshed_at
    now = time.monotonic()
    if now - _rss_refreshed_at >= _RSS_REFRESH_SECONDS:
        _rss_refreshed_at = now
        PROCESS_RSS.labels(pid=str(os.getpid())).set(psutil.Process().memory_info().rss)


def metrics_view(request):
    _refresh_process_rss()
    return HttpResponse(generate_latest(_registry()), content_type=CONTENT_TYPE_LATEST)


class RequestMetricsMiddleware:
    """Counts and times every request by route pattern (bounded label cardinality)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        started = time.perf_counter()
        response = self.get_response(request)
        match = getattr(request, "resolver_match", None)
        route = match.route if match is not None else "unmatched"
        HTTP_LATENCY.labels(request.method, route).observe(time.perf_counter() - started)
        HTTP_REQUESTS.labels(request.method, route, str(response.status_code)).inc()
        _refresh_process_rss()
        return response
