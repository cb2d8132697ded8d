"""The FastAPI routes: health, readiness, discovery, prediction, reload, metrics.

Routes only; the work is elsewhere: ``codec`` turns bodies into arrays and back,
``runner`` owns the device, ``manager`` loads and swaps models. Every error, including
the framework's own 404/405/422, answers in the contract's shape
``{"error": {"message", "type", "code"}}``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from nexus_cli import __version__
from nexus_cli.serving import (
    InvalidInput,
    ServingError,
    Unauthorized,
    Unavailable,
    error_for_status,
)
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from model_server.body import BUDGET_BODIES, BodyBudget, read_body
from model_server.codec import check_outputs, decode_batch, encode_outputs
from model_server.loading import LOADERS
from model_server.manager import ModelManager
from model_server.metrics import Metrics
from model_server.runner import DeviceRunner
from model_server.settings import Settings

log = logging.getLogger("model_server")

SERVICE_NAME = "nexus-model-server"
#: bodies up to this size are decoded on the event loop: a thread hop costs ~0.3 ms, and
#: decoding 512 KiB of numbers holds the loop for ~3 ms at most
INLINE_BYTES = 512 * 1024
#: outputs up to this many numbers are encoded on the event loop
INLINE_OUTPUTS = 16 * 1024

_PREDICT_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["inputs"],
                "properties": {
                    "inputs": {
                        "type": "array",
                        "description": "one sample per item: numbers nested in lists, "
                        "without the batch dimension",
                        "items": {},
                    }
                },
            },
            "example": {"inputs": [[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]]},
        }
    },
}


def _error_response(error: ServingError, metrics: Metrics | None = None) -> JSONResponse:
    if metrics is not None:
        metrics.errors.labels(error.code).inc()
    headers = error.headers()
    if error.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _require_json(request: Request) -> None:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        error = error_for_status(
            415, f"send the body as application/json (got {media or 'no content type'})"
        )
        error.code = "unsupported_media_type"
        raise error


def create_app(settings: Settings) -> FastAPI:
    """The model server's app; the model loads in the background once it starts."""
    metrics = Metrics()
    budget = BodyBudget(BUDGET_BODIES * settings.max_body_bytes)
    metrics.body_bytes.set_function(lambda: budget.used)
    big_decodes = asyncio.Semaphore(1)  # parsing holds the GIL: one at a time is as fast

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runner = DeviceRunner(settings.queue_size, observe=metrics.observe_batch)
        metrics.watch_queue(lambda: runner.depth)
        manager = ModelManager(settings, runner, metrics)
        app.state.runner, app.state.manager = runner, manager
        tasks: set[asyncio.Task] = set()

        def spawn(coroutine: Any) -> None:
            task = asyncio.get_running_loop().create_task(coroutine)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        spawn(manager.initial_load())
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, lambda: spawn(_reload_quietly(manager)))
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            log.info("SIGHUP reload is not available here; use POST /admin/reload")
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.to_thread(runner.close)

    app = FastAPI(
        title="NexusML model server",
        version=__version__,
        description="Serves the latest recorded version of a model: batched inference, "
        "hot reload, metrics.",
        lifespan=lifespan,
    )

    def manager_of(request: Request) -> ModelManager:
        return request.app.state.manager

    async def require_token(request: Request) -> None:  # async: no threadpool hop
        if settings.api_token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), settings.api_token.encode()
        ):
            raise Unauthorized("missing or wrong bearer token (Authorization: Bearer <token>)")

    # errors ----------------------------------------------------------------------------

    @app.exception_handler(ServingError)
    async def on_serving_error(_request: Request, exc: ServingError) -> JSONResponse:
        return _error_response(exc, metrics)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        response = _error_response(error_for_status(exc.status_code, message), metrics)
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else "invalid request"
        return _error_response(InvalidInput(message), metrics)

    @app.exception_handler(Exception)
    async def on_unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error", exc_info=exc)
        return _error_response(ServingError("internal error; see the server log"), metrics)

    # routes ----------------------------------------------------------------------------

    @app.get("/health", operation_id="health", tags=["health"])
    async def health() -> dict[str, str]:
        """200 while the process lives."""
        return {"status": "ok"}

    @app.get("/readyz", operation_id="readyz", tags=["health"])
    async def readyz(request: Request) -> JSONResponse:
        """200 once a model serves, else 503 with the reason in ``checks``."""
        manager = manager_of(request)
        document = manager.readiness()
        if manager.ready:
            return JSONResponse(document)
        error = Unavailable(manager.reason, code="not_ready", retry_after=5)
        return JSONResponse({**document, **error.body()}, status_code=503, headers=error.headers())

    @app.get("/v1/metadata", operation_id="metadata", tags=["discovery"])
    async def metadata(request: Request) -> dict[str, Any]:
        """The discovery document: service, endpoints, the model serving, the limits."""
        model = manager_of(request).model
        return {
            "schema_version": "v1",
            "service": {"name": SERVICE_NAME, "version": __version__},
            "capabilities": {
                "predict_batch": True,
                "hot_reload": True,
                "metrics": True,
                "auth": settings.api_token is not None,
                "formats": list(LOADERS),
                "ready": model is not None,
            },
            "endpoints": _endpoints(request.app),
            "model": None
            if model is None
            else {
                "name": model.name,
                "commit_hash": model.commit_hash,
                "sha256": model.record.sha256,
                "format": model.format,
                "device": str(model.device),
                "signature": model.signature,
            },
            "limits": {
                "max_batch_size": settings.max_batch,
                "max_concurrency": settings.concurrency,
                "max_body_bytes": settings.max_body_bytes,
            },
        }

    @app.post(
        "/predict/batch",
        operation_id="predict_batch",
        tags=["inference"],
        dependencies=[Depends(require_token)],
        openapi_extra={"requestBody": _PREDICT_BODY},
        response_class=Response,
    )
    async def predict_batch(request: Request) -> Response:
        """``{"inputs": [x1, ...]}`` -> ``{"outputs": [y1, ...], "model": {...}}``, in order."""
        _require_json(request)
        model = manager_of(request).model
        if model is None:
            raise Unavailable(
                f"no model is serving yet: {manager_of(request).reason}", retry_after=5
            )
        async with budget.hold() as share:  # held until the answer is written
            reading = time.perf_counter()
            body = await read_body(request, settings.max_body_bytes, share, settings.body_timeout_s)
            started = time.perf_counter()
            if len(body) <= INLINE_BYTES:
                batch = decode_batch(body, model.input_spec, settings.max_batch)
            else:
                async with big_decodes:
                    batch = await run_in_threadpool(
                        decode_batch, body, model.input_spec, settings.max_batch
                    )
            del body
            decoded = time.perf_counter()
            ran = await request.app.state.runner.run(model, [g.array for g in batch.groups])
            returned = time.perf_counter()
            check_outputs(batch, ran.outputs)
            tag = {"name": model.name, "commit_hash": model.commit_hash}
            if batch.count * ran.outputs[0][0].size <= INLINE_OUTPUTS:
                content = encode_outputs(batch, ran.outputs, tag)
            else:
                content = await run_in_threadpool(encode_outputs, batch, ran.outputs, tag)
            encoded = time.perf_counter()
        metrics.decode_seconds.observe(decoded - started)
        metrics.encode_seconds.observe(encoded - returned)
        timing = {
            "read": started - reading,
            "decode": decoded - started,
            "queue": ran.queue_seconds,
            "forward": ran.forward_seconds,
            "encode": encoded - returned,
        }
        return Response(
            content,
            media_type="application/json",
            headers={
                "Server-Timing": ", ".join(f"{k};dur={v * 1000:.3f}" for k, v in timing.items())
            },
        )

    @app.post(
        "/admin/reload",
        operation_id="reload",
        tags=["admin"],
        dependencies=[Depends(require_token)],
    )
    async def reload(request: Request) -> dict[str, Any]:
        """Re-read the metadata; swap to the latest version once it is loaded and warm.

        200 ``{"from_commit", "to_commit", "model", "changed"}`` after the swap (equal
        commits when nothing changed). On failure the old model keeps serving: 502 when
        the store failed or holds other bytes, 409 when the version cannot be served,
        503 when the device is out of memory.
        """
        result = await manager_of(request).reload("POST /admin/reload")
        return {
            "from_commit": result.from_commit,
            "to_commit": result.to_commit,
            "model": result.model,
            "changed": result.changed,
        }

    @app.get("/metrics", operation_id="metrics", tags=["health"])
    async def prometheus() -> Response:
        """Prometheus text."""
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _reload_quietly(manager: ModelManager) -> None:
    try:
        await manager.reload("SIGHUP")
    except ServingError:
        pass  # logged by the manager; the old model keeps serving
    except Exception:  # noqa: BLE001 - a signal handler must not take the loop down
        log.exception("SIGHUP reload failed unexpectedly")


def _endpoints(app: FastAPI) -> list[dict[str, str]]:
    found = []
    for route in app.routes:
        methods = getattr(route, "methods", None) or ()
        operation_id = getattr(route, "operation_id", None)
        for method in sorted(methods - {"HEAD"}):
            found.append(
                {"path": route.path, "method": method, "operation_id": operation_id or route.name}
            )
    return found
