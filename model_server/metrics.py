"""Prometheus metrics of one server, in a registry of its own (two apps in one process,
as in tests, do not collide)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.batches = Counter(
            "nexus_server_batches", "Requests run on the device (one or more forward passes)",
            registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "nexus_server_batch_size", "Samples per request", buckets=_SIZES, registry=r
        )
        self.queue_depth = Gauge(
            "nexus_server_queue_depth", "Requests waiting for the device", registry=r
        )
        self.body_bytes = Gauge(
            "nexus_server_body_bytes_in_flight",
            "Bytes of request bodies held by the requests in flight (bounded)", registry=r,
        )  # fmt: skip
        self.inference_seconds = Histogram(
            "nexus_server_inference_seconds", "Forward passes of one request, on the device",
            buckets=_SECONDS, registry=r,
        )  # fmt: skip
        self.decode_seconds = Histogram(
            "nexus_server_decode_seconds", "JSON body to checked arrays", buckets=_SECONDS,
            registry=r,
        )  # fmt: skip
        self.encode_seconds = Histogram(
            "nexus_server_encode_seconds", "Outputs to the JSON answer", buckets=_SECONDS,
            registry=r,
        )  # fmt: skip
        self.load_seconds = Gauge(
            "nexus_server_load_seconds", "Duration of the last run of each load step",
            ["step"], registry=r,
        )  # fmt: skip
        self.errors = Counter("nexus_server_errors", "Error answers by code", ["code"], registry=r)
        self.reloads = Counter(
            "nexus_server_reloads", "Reload attempts by result", ["result"], registry=r
        )
        self.model_info = Gauge(
            "nexus_server_model_info", "The model being served (value 1)",
            ["model", "commit_hash", "format", "device"], registry=r,
        )  # fmt: skip

    def watch_queue(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(depth)

    def observe_batch(self, samples: int, seconds: float) -> None:
        """Called by the device worker after each request's forward passes."""
        self.batches.inc()
        self.batch_size.observe(samples)
        self.inference_seconds.observe(seconds)

    def serving(self, model: str, commit_hash: str, fmt: str, device: str) -> None:
        """Point ``model_info`` at the model now serving (and only at it)."""
        self.model_info.clear()
        self.model_info.labels(model, commit_hash, fmt, device).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
