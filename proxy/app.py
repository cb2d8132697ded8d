"""The standalone proxy app: the router, the lifespan, and handlers for framework errors."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from nexus_cli.serving import BadRequest, ServingError, error_for_status
from starlette.exceptions import HTTPException as StarletteHTTPException

from proxy.routes import create_router, error_response
from proxy.service import VERSION, ProxyService, new_request_id
from proxy.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    """The proxy as a FastAPI app; ``app.state.service`` is its ``ProxyService``."""
    service = ProxyService(settings or Settings.from_env())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with service.running():
            yield

    app = FastAPI(
        title="NexusML proxy",
        version=VERSION,
        summary="Batches prediction requests in front of NexusML model servers.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.include_router(create_router(service))
    install_error_handlers(app)
    return app


def install_error_handlers(app: FastAPI) -> None:
    """Framework errors (unknown route, wrong method, bad parameters) in our error shape."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        error = error_for_status(exc.status_code, str(exc.detail))
        response = error_response(error, new_request_id(request.headers.get("x-request-id")))
        response.headers.update(exc.headers or {})  # a 405's Allow
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return error_response(BadRequest(f"bad request: {exc.errors()[:1]}"))

    @app.exception_handler(ServingError)
    async def serving_error(request: Request, exc: ServingError):
        return error_response(exc, new_request_id(request.headers.get("x-request-id")))
