"""The proxy as one object: settings, model servers, batcher, metrics, registration.

``routes.create_router(service)`` turns it into HTTP routes; ``app.create_app`` into a
standalone app. A gateway that includes the router runs ``async with service.running():``
in its own lifespan.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import orjson
from nexus_cli.serving import (
    DEFAULT_INPUT,
    DEFAULT_OUTPUT,
    SignatureError,
    TensorSpec,
    Unauthorized,
    Unavailable,
    sample_specs,
)

from proxy.backends import ModelServers
from proxy.batcher import Batcher, Reply
from proxy.metrics import Metrics
from proxy.settings import Settings

log = logging.getLogger("nexus.proxy")

VERSION = "0.1.0"


class ProxyService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.servers = ModelServers(
            settings.model_server_urls,
            token=settings.model_server_token,
            health_interval_s=settings.health_interval_s,
            on_change=self._upstreams_changed,
        )
        self.batcher: Batcher | None = None
        self.endpoints: list[dict[str, str]] = []  # filled by routes.create_router
        self._token = settings.api_token.encode() if settings.api_token else None
        self._registration: Any = None
        self._registered_commit: str | None = None
        self._background: set[asyncio.Task] = set()
        self.draining = False

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        await self.servers.start()
        self.batcher = Batcher(
            self.servers.servers,
            max_batch_size=self.settings.max_batch_size,
            max_wait_s=self.settings.max_wait_ms / 1000,
            max_queue=self.settings.max_queue,
            max_queue_bytes=self.settings.max_queue_bytes,
            observer=self.metrics,
        )
        batcher = self.batcher
        self.metrics.watch(
            lambda: batcher.queue_depth, lambda: batcher.queued_bytes, batcher.in_flight
        )
        self.batcher.start()
        self._upstreams_changed()
        if self.settings.etcd_endpoints:
            await self._register()

    async def stop(self) -> None:
        """Drain: new requests get 503, queued and in-flight ones finish (bounded)."""
        self.begin_drain()
        if self._registration is not None:
            with contextlib.suppress(Exception):
                await self._registration.stop()
        if self.batcher is not None:
            await self.batcher.drain(self.settings.request_timeout_s)
            await self.batcher.stop()
        await self.servers.stop()

    def begin_drain(self) -> None:
        self.draining = True
        if self.batcher is not None:
            self.batcher.draining = True

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[ProxyService]:
        await self.start()
        try:
            yield self
        finally:
            await self.stop()

    async def _register(self) -> None:
        from proxy.registration import Registration  # h5's module; only needed with etcd

        assert self.settings.advertise_url is not None  # settings guarantee it
        self._registration = Registration(
            list(self.settings.etcd_endpoints),
            self.settings.advertise_url,
            self.settings.etcd_ttl_s,
            self.settings.instance_id,
        )
        self._registered_commit = (self.model() or {}).get("commit_hash")
        await self._registration.start(self.discovery())

    def _update_registration(self) -> None:
        """Publish the discovery document again when the model behind the proxy changed."""
        commit = (self.model() or {}).get("commit_hash")
        if self._registration is None or commit == self._registered_commit or self.draining:
            return
        self._registered_commit = commit
        task = asyncio.get_running_loop().create_task(self._registration.update(self.discovery()))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _upstreams_changed(self) -> None:
        for server in self.servers.servers:
            self.metrics.upstream_ready.labels(server.url).set(1 if server.ready else 0)
        if self.batcher is not None:
            self.batcher.notify()
        self._update_registration()

    # -- what routes ask ---------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return not self.draining and self.servers.ready

    def authorize(self, authorization: str | None) -> None:
        """Constant-time bearer check when ``NEXUS_API_TOKEN`` is set."""
        if self._token is None:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), self._token
        ):
            raise Unauthorized("missing or wrong bearer token (Authorization: Bearer <token>)")

    def model_metadata(self) -> dict[str, Any] | None:
        return self.servers.model_metadata()

    def model(self) -> dict[str, Any] | None:
        document = self.model_metadata()
        return (document or {}).get("model")

    def specs(self) -> tuple[TensorSpec, TensorSpec]:
        """The served model's input and output spec (any shape FP32 when unknown)."""
        model = self.model()
        if model is None:
            return DEFAULT_INPUT, DEFAULT_OUTPUT
        try:
            spec, output = sample_specs(model.get("signature"))
        except (SignatureError, KeyError, TypeError) as exc:
            raise Unavailable(f"the served model's signature cannot be served: {exc}") from None
        # [-1] (a batch of unknown samples) is how a server publishes "no signature"
        # (SPEC 7): then only "numeric and rectangular" is checked here
        return _any_shape(spec), _any_shape(output)

    def commits(self) -> list[str]:
        seen = []
        for server in self.servers.servers:
            commit = (server.model or {}).get("commit_hash")
            if server.ready and commit and commit not in seen:
                seen.append(commit)
        return seen

    async def infer(self, rows: np.ndarray | Any, n: int, timeout: float, request_id: str) -> Reply:
        """Send ``n`` samples (``rows`` has them batch-first) through the batcher."""
        if self.batcher is None or self.draining:
            raise Unavailable("the proxy is shutting down", retry_after=1)
        part = _encode(rows)
        return await self.batcher.submit(part, n, timeout, request_id)

    def timeout(self, *asked: float | None) -> float:
        return min([self.settings.request_timeout_s, *(t for t in asked if t is not None)])

    def discovery(self) -> dict[str, Any]:
        """``GET /v1/metadata``: the proxy's routes and the model behind it."""
        s = self.settings
        document = self.model_metadata() or {}
        servers = self.servers.servers
        return {
            "schema_version": "v1",
            "service": {"name": "nexus-proxy", "version": VERSION},
            "capabilities": {
                "batching": True,
                "open_inference_protocol": True,
                "binary_tensor_data": True,
                "auth": self._token is not None,
                "replicas": len(s.model_server_urls),
            },
            "endpoints": self.endpoints,
            "model": document.get("model"),
            "limits": {
                "max_batch_size": s.max_batch_size,
                "max_request_samples": max(
                    [s.max_batch_size, *(u.max_batch_size for u in servers if u.ready)]
                ),
                "max_concurrency": sum(u.max_concurrency for u in servers if u.ready),
                "max_body_bytes": s.max_body_bytes,
                "max_queue": s.max_queue,
                "max_wait_ms": s.max_wait_ms,
                "request_timeout_s": s.request_timeout_s,
            },
        }


def _any_shape(spec: TensorSpec) -> TensorSpec:
    return TensorSpec(spec.name, spec.datatype, None) if spec.shape == () else spec


def _encode(rows: Any) -> bytes:
    """Rows (batch first) as the inside of a JSON list, for the batcher to join."""
    if isinstance(rows, np.ndarray):
        return orjson.dumps(np.ascontiguousarray(rows), option=orjson.OPT_SERIALIZE_NUMPY)[1:-1]
    return orjson.dumps(rows)[1:-1]


def new_request_id(given: str | None) -> str:
    """The caller's ``X-Request-ID`` when it is sane, else a fresh one."""
    if given and len(given) <= 128 and given.isascii() and given.isprintable() and "," not in given:
        return given
    return uuid.uuid4().hex
