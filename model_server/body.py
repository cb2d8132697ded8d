"""Reading request bodies with bounded memory and time.

Each body is bounded by ``NEXUS_MAX_BODY_BYTES`` (413, chunked bodies too, cut off as
soon as they pass it) and must arrive within ``NEXUS_BODY_TIMEOUT_S`` (408): a client
that trickles a body a byte at a time must not hold a connection and its memory forever.

The bodies of all requests in flight share a ``BodyBudget``: a 64 MiB body of tiny
numbers costs ~15 times its size while it is parsed into Python objects, so the bytes
held at once (arriving, waiting, being decoded, on the device) are bounded; past the
budget, 503 ``queue_full`` with ``Retry-After``. Large bodies are decoded one at a time
(``decode_slot``): parsing holds the GIL, so two at once are no faster, only bigger.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from nexus_cli.serving import PayloadTooLarge, ServingError, Unavailable
from starlette.requests import ClientDisconnect, Request

#: the bodies in flight at once may hold this many times NEXUS_MAX_BODY_BYTES
BUDGET_BODIES = 4


class RequestTimeout(ServingError):
    """The body did not arrive in time (a slow or stalled client)."""

    status, type, code = 408, "invalid_request_error", "request_timeout"


class ClientGone(ServingError):
    """The caller hung up before its body arrived: nobody reads the answer (nginx's 499);
    counted in the metrics, never logged as a server error."""

    status, type, code = 499, "invalid_request_error", "client_closed_request"


class BodyBudget:
    """Bytes of request bodies held at once, across requests; past ``limit``, 503."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[BodyBudget.Share]:
        """A share of the budget for one request, given back when the block ends."""
        share = BodyBudget.Share(self)
        try:
            yield share
        finally:
            self.used -= share.size

    class Share:
        def __init__(self, budget: BodyBudget) -> None:
            self.budget = budget
            self.size = 0

        def take(self, size: int) -> None:
            budget = self.budget
            if budget.used + size > budget.limit:
                raise Unavailable(
                    f"too many request bytes in flight at once (over {budget.limit}); "
                    "retry shortly",
                    code="queue_full",
                    retry_after=1,
                )
            budget.used += size
            self.size += size


async def read_body(request: Request, limit: int, share: BodyBudget.Share, timeout: float) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes, with 408
    when it has not all arrived within ``timeout`` seconds, and with 503 when the bodies
    in flight would pass the budget.

    ``Content-Length`` is checked first, but counted bytes decide: a chunked body (or
    one that lies about its length) is cut off at the limit, never read whole.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {limit} bytes")
    chunks: list[bytes] = []
    received = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    raise PayloadTooLarge(f"the body passed the limit of {limit} bytes")
                share.take(len(chunk))
                chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone("the client closed the connection before its body arrived") from None
    except TimeoutError:
        raise RequestTimeout(
            f"the body did not arrive within {timeout:g} s (NEXUS_BODY_TIMEOUT_S)"
        ) from None
    return b"".join(chunks)
