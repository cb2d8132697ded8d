"""The proxy's HTTP routes as an ``APIRouter`` a gateway can include.

Each route answers errors itself in the shared shape (``{"error": {...}}``), so the
router behaves the same inside any FastAPI app; ``app.py`` adds handlers only for what
the framework raises before a route runs (404, 405). Bodies are read with a limit
(chunked ones too) and parsed with orjson; no pydantic on the hot path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute
from nexus_cli.serving import (
    BadRequest,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    QueueFull,
    ServingError,
    Unavailable,
    check_sample,
)
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import ClientDisconnect

from proxy import v2
from proxy.service import ProxyService, new_request_id

log = logging.getLogger("nexus.proxy")
T = TypeVar("T")

JSON = "application/json"

PREDICT_BODY = {
    JSON: {
        "schema": {
            "type": "object",
            "required": ["input"],
            "properties": {"input": {"description": "one sample: numbers nested in lists"}},
        },
        "example": {"input": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]},
    }
}
V2_BODY = {
    JSON: {
        "schema": {"type": "object", "required": ["inputs"]},
        "example": {
            "inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [0.0] * 8}]
        },
    },
    "application/octet-stream": {
        "schema": {"type": "string", "format": "binary"},
        "description": "binary tensor data extension: JSON header "
        "(Inference-Header-Content-Length bytes), then raw little-endian tensors",
    },
}


def json_response(document: Any, status: int = 200, headers: dict[str, str] | None = None):
    return Response(orjson.dumps(document), status_code=status, media_type=JSON, headers=headers)


def error_response(error: ServingError, request_id: str | None = None) -> Response:
    headers = error.headers()
    if request_id:
        headers["X-Request-ID"] = request_id
    return json_response(error.body(), error.status, headers)


class BodyBudget:
    """Bytes of request bodies being read at once, across requests, bounded.

    Each body is bounded by ``NEXUS_MAX_BODY_BYTES``, and the queue by
    ``NEXUS_MAX_QUEUE_BYTES``; this bounds the bodies still arriving, so memory stays
    bounded however many clients send at once: past it, 429 with ``Retry-After``.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> None:
        if self.used + size > self.limit:
            raise QueueFull(
                f"too many request bytes arriving at once (over {self.limit})", retry_after=1
            )
        self.used += size

    def give_back(self, size: int) -> None:
        self.used -= size


class RequestTimeout(ServingError):
    """The body did not arrive within the request's deadline (a slow or stalled client)."""

    status, type, code = 408, "invalid_request_error", "request_timeout"


class ClientGone(Exception):
    """The caller closed its connection: there is nobody left to answer."""


async def read_body(
    request: Request, limit: int, budget: BodyBudget | None = None, timeout: float | None = None
) -> bytes:
    """The whole body, refused with 413 as soon as it passes ``limit`` (chunked too), and
    with 408 when it has not arrived within ``timeout`` seconds (a stalled client must not
    hold its connection and its share of the budget forever)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {limit}")
        except ValueError:
            raise BadRequest("Content-Length is not a number") from None
    chunks: list[bytes] = []
    size = 0  # read so far, and taken from the budget
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                if budget is not None:
                    budget.take(len(chunk))
                size += len(chunk)
                chunks.append(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"the body is over the limit of {limit} bytes")
    except TimeoutError:
        raise RequestTimeout(f"the body did not arrive within {timeout:g} s") from None
    except ClientDisconnect:
        raise ClientGone from None
    finally:
        if budget is not None:
            budget.give_back(size)
    return b"".join(chunks)


async def unless_caller_leaves(request: Request, work: Awaitable[T]) -> T:
    """``await work``, unless the caller hangs up first: then ``work`` is cancelled (the
    batcher drops a cancelled request before it joins a batch) and ``ClientGone`` raised.

    The server does not cancel a handler whose client left; the only sign is an
    ``http.disconnect`` from ``receive`` once the body has been read, so one watcher task
    waits for it while the request is queued or in flight.
    """
    task = asyncio.current_task()
    assert task is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        if (await request.receive())["type"] == "http.disconnect":
            gone = True
            task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if gone and task.uncancel() == 0:
            raise ClientGone from None
        raise
    finally:
        watcher.cancel()


def _asked_timeout(request: Request) -> float | None:
    raw = request.headers.get("x-request-timeout")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise BadRequest("X-Request-Timeout must be a positive number of seconds")
    return value


def create_router(service: ProxyService) -> APIRouter:
    """Every proxy route, bound to ``service``; fills ``service.endpoints``."""
    router = APIRouter()
    settings = service.settings
    metrics = service.metrics
    budget = BodyBudget(settings.max_queue_bytes)

    def fast_route(
        path: str,
        endpoint: Callable[..., Awaitable[Response]],
        operation_id: str,
        tag: str,
        body: dict[str, Any],
    ) -> None:
        """A hot route served by a plain Starlette route (no dependency solving, no query
        parsing: about a quarter of the proxy's CPU per request), plus a twin that only
        documents it in OpenAPI (the first route matches, so the twin never serves)."""

        async def serve(request: Request) -> Response:
            return await endpoint(request, **request.path_params)

        router.add_route(path, serve, methods=["POST"], include_in_schema=False)
        router.add_api_route(
            path, endpoint, methods=["POST"], operation_id=operation_id, tags=[tag],
            openapi_extra={"requestBody": {"required": True, "content": body}},
        )  # fmt: skip

    async def answer(
        route: str, request: Request, handler: Callable[[str], Awaitable[Response]]
    ) -> Response:
        """Run a guarded route: request id, auth, errors in our shape, metrics."""
        request_id = new_request_id(request.headers.get("x-request-id"))
        try:
            service.authorize(request.headers.get("authorization"))
            response = await handler(request_id)
        except ClientGone:  # nobody reads this answer; 499 as nginx counts it
            metrics.answered(route, 499, "client_closed_request")
            return Response(status_code=499)
        except ServingError as error:
            metrics.answered(route, error.status, error.code)
            return error_response(error, request_id)
        except Exception:  # a bug: logged with its traceback, the caller gets our shape
            log.exception("unexpected error on %s (request %s)", route, request_id)
            metrics.answered(route, 500, "internal_error")
            return error_response(ServingError("internal error in the proxy"), request_id)
        response.headers["X-Request-ID"] = request_id
        metrics.answered(route, response.status_code)
        return response

    # -- prediction ----------------------------------------------------------------------

    async def predict(request: Request) -> Response:
        """`{"input": x}` -> `{"output": y, "model": {"name", "commit_hash"}}`, batched."""

        async def handle(request_id: str) -> Response:
            timeout = service.timeout(_asked_timeout(request))
            begin = asyncio.get_running_loop().time()
            body = await read_body(request, settings.max_body_bytes, budget, timeout)
            spec, _ = service.specs()
            try:
                document = orjson.loads(body)
            except orjson.JSONDecodeError:
                raise BadRequest('the body is not JSON; send {"input": [...]}') from None
            if not isinstance(document, dict) or "input" not in document:
                raise BadRequest('expected a JSON object {"input": [...]}')
            value = document["input"]
            literals = b"true" in body or b"false" in body  # maybe in another field, a string
            if spec.datatype != "BOOL" and literals and v2.has_bool(value):
                raise InvalidInput(f"input: expected numbers ({spec.datatype}), got booleans")
            sample = check_sample(value, spec, "input")
            if sample.ndim > v2.MAX_SAMPLE_DIMS:
                raise InvalidInput(
                    f"input: {sample.ndim} dimensions; at most {v2.MAX_SAMPLE_DIMS} are served"
                )
            left = timeout - (asyncio.get_running_loop().time() - begin)
            reply = await unless_caller_leaves(
                request, service.infer(sample[None], 1, left, request_id)
            )
            return Response(
                orjson.dumps({"output": reply.outputs[0], "model": _model_ref(reply.model)}),
                media_type=JSON,
            )

        return await answer("predict", request, handle)

    fast_route("/predict", predict, "predict", "predict", PREDICT_BODY)

    # -- health and discovery ------------------------------------------------------------

    @router.get("/health", operation_id="health", tags=["health"])
    async def health() -> Response:
        return json_response({"status": "ok"})

    @router.get("/readyz", operation_id="readyz", tags=["health"])
    async def readyz() -> Response:
        checks = {"model_servers": service.servers.reasons()}
        if service.draining:
            checks["proxy"] = "shutting down"
        if service.ready:
            return json_response({"status": "ready", "checks": checks})
        return json_response({"status": "not ready", "checks": checks}, 503, {"Retry-After": "1"})

    @router.get("/v1/metadata", operation_id="metadata", tags=["discovery"])
    async def metadata() -> Response:
        return json_response(service.discovery())

    @router.get("/v1/models", operation_id="list_models", tags=["discovery"])
    async def list_models(request: Request) -> Response:
        async def handle(request_id: str) -> Response:
            model = service.model()
            data = []
            if model:
                data.append(
                    {
                        "id": model.get("name"),
                        "object": "model",
                        "owned_by": "nexusml",
                        "commit_hash": model.get("commit_hash"),
                    }
                )
            return json_response({"object": "list", "data": data})

        return await answer("list_models", request, handle)

    @router.get("/metrics", operation_id="metrics", tags=["health"])
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- Open Inference Protocol (KServe v2) ---------------------------------------------

    @router.get("/v2", operation_id="v2_server_metadata", tags=["v2"])
    async def v2_server(request: Request) -> Response:
        async def handle(request_id: str) -> Response:
            return json_response(
                {"name": "nexus-proxy", "version": "0.1.0", "extensions": v2.EXTENSIONS}
            )

        return await answer("v2_server_metadata", request, handle)

    @router.get("/v2/health/live", operation_id="v2_live", tags=["v2"])
    async def v2_live() -> Response:
        return json_response({"live": True})

    @router.get("/v2/health/ready", operation_id="v2_ready", tags=["v2"])
    async def v2_ready() -> Response:
        ready = service.ready
        return json_response({"ready": ready}, 200 if ready else 503)

    def served(name: str, version: str | None) -> tuple[dict[str, Any], str]:
        """The model ``name`` at ``version`` (a served commit), else 404."""
        model = service.model()
        if model is None:
            raise Unavailable("no model server has published a model yet", retry_after=1)
        if name != model.get("name"):
            raise NotFound(
                f"model {name!r} is not served here; this proxy serves {model.get('name')!r}"
            )
        commits = service.commits() or [model.get("commit_hash")]
        if version is not None and version not in commits:
            raise NotFound(
                f"version {version!r} of {name!r} is not served; served: {', '.join(commits)}"
            )
        return model, version or str(model.get("commit_hash"))

    async def v2_model(request: Request, name: str, version: str | None = None) -> Response:
        async def handle(request_id: str) -> Response:
            model, _ = served(name, version)
            spec, output = service.specs()
            commits = service.commits() or [str(model.get("commit_hash"))]
            return json_response(
                v2.model_metadata(name, commits, model.get("format"), spec, output)
            )

        return await answer("v2_model_metadata", request, handle)

    async def v2_model_ready(request: Request, name: str, version: str | None = None) -> Response:
        async def handle(request_id: str) -> Response:
            served(name, version)
            ready = service.ready
            return json_response({"name": name, "ready": ready}, 200 if ready else 503)

        return await answer("v2_model_ready", request, handle)

    async def v2_infer(request: Request, name: str, version: str | None = None) -> Response:
        async def handle(request_id: str) -> Response:
            timeout = service.timeout(_asked_timeout(request))
            begin = asyncio.get_running_loop().time()
            body = await read_body(request, settings.max_body_bytes, budget, timeout)
            _, served_version = served(name, version)
            spec, output = service.specs()
            decoded = v2.parse_infer(body, request.headers.get(v2.HEADER_LENGTH), spec, output)
            left = timeout - (asyncio.get_running_loop().time() - begin)
            if decoded.timeout_s is not None:
                left = min(left, decoded.timeout_s)
            rows = decoded.rows
            reply = await unless_caller_leaves(
                request, service.infer(rows, len(rows), left, request_id)
            )
            commit = str(reply.model.get("commit_hash") or served_version)
            if version is not None and commit != version:
                raise Unavailable(f"version {version!r} was replaced while the request ran")
            content, headers = v2.encode_infer_response(
                decoded, reply.outputs, output, name, commit
            )
            return Response(content, headers=headers)

        return await answer("v2_infer", request, handle)

    for prefix, suffix in (
        ("/v2/models/{name}", ""),
        ("/v2/models/{name}/versions/{version}", "_version"),
    ):
        router.add_api_route(
            prefix,
            v2_model,
            methods=["GET"],
            operation_id=f"v2_model_metadata{suffix}",
            tags=["v2"],
        )
        router.add_api_route(
            f"{prefix}/ready", v2_model_ready, methods=["GET"],
            operation_id=f"v2_model_ready{suffix}", tags=["v2"],
        )  # fmt: skip
        fast_route(f"{prefix}/infer", v2_infer, f"v2_infer{suffix}", "v2", V2_BODY)

    service.endpoints = [
        {"path": route.path, "method": method, "operation_id": route.operation_id or route.name}
        for route in router.routes
        if isinstance(route, APIRoute)
        for method in sorted(route.methods)
    ]
    return router


def _model_ref(model: dict[str, Any]) -> dict[str, Any]:
    return {"name": model.get("name"), "commit_hash": model.get("commit_hash")}
