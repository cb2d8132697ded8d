"""Reading request bodies: the per-body limit and the budget shared by bodies arriving at once."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request

from nexus_cli.serving import BadRequest, PayloadTooLarge, QueueFull
from proxy.routes import BodyBudget, read_body


def request(chunks: list[bytes], headers: dict[str, str] | None = None) -> Request:
    """A Starlette request whose body arrives in ``chunks`` (chunked: no Content-Length)."""
    pending = list(chunks)

    async def receive():
        body = pending.pop(0) if pending else b""
        return {"type": "http.request", "body": body, "more_body": bool(pending)}

    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Request({"type": "http", "method": "POST", "headers": raw}, receive)


def test_a_body_is_read_whole_and_the_budget_given_back() -> None:
    budget = BodyBudget(100)
    body = asyncio.run(read_body(request([b"ab", b"cd", b"e"]), 10, budget))
    assert body == b"abcde"
    assert budget.used == 0


def test_declared_and_chunked_bodies_over_the_limit_are_413() -> None:
    with pytest.raises(PayloadTooLarge):
        asyncio.run(read_body(request([b"x"], {"Content-Length": "11"}), 10))
    budget = BodyBudget(100)
    with pytest.raises(PayloadTooLarge):
        asyncio.run(read_body(request([b"123456", b"789012"]), 10, budget))
    assert budget.used == 0  # what was taken is given back on the way out
    with pytest.raises(BadRequest):
        asyncio.run(read_body(request([b"x"], {"Content-Length": "many"}), 10))


def test_bodies_arriving_at_once_share_a_bounded_budget() -> None:
    async def main():
        budget = BodyBudget(10)
        gate = asyncio.Event()

        async def slow_receive_request():
            first = True

            async def receive():
                nonlocal first
                if first:
                    first = False
                    return {"type": "http.request", "body": b"12345678", "more_body": True}
                await gate.wait()
                return {"type": "http.request", "body": b"", "more_body": False}

            return Request({"type": "http", "method": "POST", "headers": []}, receive)

        holding = asyncio.ensure_future(read_body(await slow_receive_request(), 100, budget))
        await asyncio.sleep(0.01)
        assert budget.used == 8
        with pytest.raises(QueueFull) as refused:
            await read_body(request([b"abcd"]), 100, budget)
        assert refused.value.headers()["Retry-After"] == "1"
        gate.set()
        assert await holding == b"12345678"
        assert budget.used == 0
        assert await read_body(request([b"abcd"]), 100, budget) == b"abcd"

    asyncio.run(main())


def test_an_unexpected_error_is_500_in_our_shape_without_a_traceback() -> None:
    import httpx
    from fastapi import FastAPI

    from proxy.routes import create_router
    from proxy.service import ProxyService
    from proxy.settings import Settings

    service = ProxyService(Settings())

    async def broken(*args, **kwargs):
        raise RuntimeError("a bug with a secret path /srv/x")

    service.infer = broken  # type: ignore[method-assign]
    app = FastAPI()
    app.include_router(create_router(service))

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
            return await client.post("/predict", json={"input": [1.0, 2.0]})

    response = asyncio.run(call())
    assert response.status_code == 500
    assert response.json() == {
        "error": {
            "message": "internal error in the proxy",
            "type": "server_error",
            "code": "internal_error",
        }
    }
    assert "x-request-id" in response.headers
