"""Prometheus metrics and the one JSON log line per batch.

Each proxy owns its registry (not the global one), so several proxies in one process
(a gateway, tests) keep their numbers apart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from proxy.batcher import BatchRecord

batch_log = logging.getLogger("nexus.proxy.batch")

_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "nexus_proxy_requests", "Requests answered, by route and status.", ["route", "code"],
            registry=r,
        )  # fmt: skip
        self.errors = Counter(
            "nexus_proxy_errors", "Requests answered with an error, by status and error code.",
            ["code", "error"], registry=r,
        )  # fmt: skip
        self.batches = Counter(
            "nexus_proxy_batches", "Batches sent, by model server and status.",
            ["upstream", "code"], registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "nexus_proxy_batch_size", "Samples per batch sent to a model server.",
            buckets=_SIZE_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_requests = Histogram(
            "nexus_proxy_batch_requests", "Requests per batch sent to a model server.",
            buckets=_SIZE_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "nexus_proxy_queue_wait_seconds", "Time a request waited in the queue for its batch.",
            buckets=_TIME_BUCKETS, registry=r,
        )  # fmt: skip
        self.round_trip = Histogram(
            "nexus_proxy_batch_round_trip_seconds",
            "Time from a batch leaving to its answer (including split retries).",
            buckets=_TIME_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "nexus_proxy_queue_depth", "Requests waiting for a batch.", registry=r
        )
        self.queue_bytes = Gauge(
            "nexus_proxy_queue_bytes", "Encoded bytes of the requests waiting.", registry=r
        )
        self.in_flight = Gauge(
            "nexus_proxy_batches_in_flight", "Batches sent and not yet answered.", registry=r
        )
        self.upstream_ready = Gauge(
            "nexus_proxy_model_server_ready", "1 when the model server is ready.", ["upstream"],
            registry=r,
        )  # fmt: skip

    def watch(
        self,
        depth: Callable[[], float],
        queued_bytes: Callable[[], float],
        in_flight: Callable[[], float],
    ) -> None:
        """Gauges read at scrape time from the live batcher."""
        self.queue_depth.set_function(depth)
        self.queue_bytes.set_function(queued_bytes)
        self.in_flight.set_function(in_flight)

    def batch_done(self, record: BatchRecord) -> None:
        """The batcher's observer: histograms, counters and one JSON log line."""
        self.batches.labels(record.upstream, str(record.status)).inc()
        self.batch_size.observe(record.samples)
        self.batch_requests.observe(record.requests)
        self.round_trip.observe(record.round_trip_s)
        for wait in record.waits_s:
            self.queue_wait.observe(wait)
        if batch_log.isEnabledFor(logging.INFO):
            batch_log.info(
                orjson.dumps(
                    {
                        "event": "batch",
                        "upstream": record.upstream,
                        "size": record.samples,
                        "requests": record.requests,
                        "wait_ms": round(record.wait_s * 1000, 3),
                        "round_trip_ms": round(record.round_trip_s * 1000, 3),
                        "status": record.status,
                        "request_ids": record.request_ids,
                    }
                ).decode()
            )

    def answered(self, route: str, status: int, error_code: str | None = None) -> None:
        self.requests.labels(route, str(status)).inc()
        if status >= 400:
            self.errors.labels(str(status), error_code or "error").inc()
