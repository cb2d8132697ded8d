"""The batcher: requests in, batches out, each caller's future resolved. No HTTP here.

One future per request and one bounded FIFO queue (bounded in requests and in bytes).
A single dispatch loop wakes on an event (a request arrived, a batch finished, an
upstream changed state, a timer fired) and sends as many batches as the upstreams have
free slots for:

* a batch holds at most ``max_batch_size`` samples (a request of several rows counts as
  that many; one larger than that goes alone, if the upstream takes it);
* the window is an upper bound, not a toll: when an upstream has a free slot and no
  other batch is in flight, the batch leaves at once. While a batch is already running,
  the next one may gather company until the running batch is about to finish (it would
  wait in the upstream's queue anyway), never longer than ``max_wait`` and never past
  the point where the learnt batch cost says its oldest request would miss its deadline;
* a request whose predicted finish is past its deadline is shed (504) instead of being
  served late; one whose caller went away (timeout, disconnect) is skipped;
* when a batch fails in a way one sample could cause, it is split in halves and retried
  so only the bad caller gets the error.

The upstream is a small protocol (``Upstream``): the real one speaks HTTP to a model
server (``proxy.backends``); tests use a fake.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from time import monotonic
from typing import Any, Protocol

from nexus_cli.serving import (
    GatewayTimeout,
    PayloadTooLarge,
    QueueFull,
    ServingError,
    Unavailable,
    UpstreamError,
)

log = logging.getLogger("nexus.proxy.batcher")

# what a request costs on the upstream wire beyond its own parts: '{"inputs":[' ... ']}'
_ENVELOPE_BYTES = 64


@dataclass(frozen=True)
class Reply:
    """What an upstream answers for a batch: one output per sample, and the model."""

    outputs: list[Any]
    model: dict[str, Any]


class BatchFailed(Exception):
    """An upstream's failure for a whole batch, with what the batcher may do about it.

    ``split``: one sample could have caused it (a 4xx, a model error), so retrying the
    halves finds the culprit. ``requeue``: the batch never reached the upstream (refused
    connection), so it may go to another one.
    """

    def __init__(self, error: ServingError, *, split: bool = False, requeue: bool = False):
        super().__init__(error.message)
        self.error = error
        self.split = split
        self.requeue = requeue


class Upstream(Protocol):
    """One model server, as the batcher sees it."""

    name: str

    @property
    def ready(self) -> bool: ...

    @property
    def max_concurrency(self) -> int: ...

    @property
    def max_batch_size(self) -> int: ...

    @property
    def max_body_bytes(self) -> int: ...

    async def send(
        self, parts: Sequence[bytes], n: int, request_ids: Sequence[str], timeout: float
    ) -> Reply:
        """Run one batch: ``parts`` are each request's encoded samples. Raises BatchFailed."""
        ...


class Observer(Protocol):
    """Told about each batch (metrics, logs); must be cheap and must not raise."""

    def batch_done(self, record: BatchRecord) -> None: ...


@dataclass(frozen=True)
class BatchRecord:
    upstream: str
    requests: int
    samples: int
    wait_s: float  # the oldest request's time in the queue
    round_trip_s: float
    status: int
    request_ids: tuple[str, ...]
    waits_s: tuple[float, ...] = ()


@dataclass(eq=False)
class Request:
    """One caller's request: ``n`` samples already encoded as ``part`` for the upstream."""

    part: bytes
    n: int
    deadline: float  # time.monotonic()
    request_id: str
    future: asyncio.Future
    enqueued: float
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = len(self.part) + 1


class CostModel:
    """Least-squares fit of ``duration = a·n + b`` over the last ``window`` batches."""

    def __init__(self, window: int = 50) -> None:
        self._points: deque[tuple[int, float]] = deque(maxlen=window)
        self._fit: tuple[float, float] | None = None

    def observe(self, n: int, duration: float) -> None:
        self._points.append((n, duration))
        self._fit = None

    @property
    def known(self) -> bool:
        return len(self._points) >= 3

    def predict(self, n: int) -> float:
        """Predicted seconds for a batch of ``n``; 0 while nothing is known."""
        if not self._points:
            return 0.0
        if self._fit is None:
            self._fit = self._solve()
        a, b = self._fit
        return max(0.0, a * n + b)

    def _solve(self) -> tuple[float, float]:
        count = len(self._points)
        mean_n = sum(n for n, _ in self._points) / count
        mean_t = sum(t for _, t in self._points) / count
        var_n = sum((n - mean_n) ** 2 for n, _ in self._points)
        if var_n == 0:  # one size seen so far: no slope to learn yet
            return 0.0, mean_t
        a = sum((n - mean_n) * (t - mean_t) for n, t in self._points) / var_n
        a = max(a, 0.0)  # a bigger batch never costs less; noise must not say otherwise
        return a, mean_t - a * mean_n


def _margin(cost: float) -> float:
    """Slack kept before a deadline or a busy device: encoding, the hop, decoding, noise."""
    return 0.002 + 0.1 * cost


@dataclass
class _Flight:
    """A batch on its way: when it left and what it is predicted to cost."""

    started: float
    predicted: float


class Batcher:
    """Gathers requests into batches for a set of upstreams; see the module docstring."""

    def __init__(
        self,
        upstreams: Sequence[Upstream],
        *,
        max_batch_size: int = 32,
        max_wait_s: float = 0.05,
        max_queue: int = 1024,
        max_queue_bytes: int = 256 * 1024 * 1024,
        observer: Observer | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1, max_wait_s >= 0")
        self.upstreams = list(upstreams)
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes
        self.cost = CostModel()
        self._observer = observer
        self._queue: deque[Request] = deque()
        self._queued_bytes = 0
        self._left = 0  # callers that left while queued, since the last purge (at least)
        self._flights: dict[int, dict[int, _Flight]] = {id(u): {} for u in self.upstreams}
        self._flight_ids = itertools.count()
        self._tasks: set[asyncio.Task] = set()
        self._wakeup = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self.draining = False

    # -- state -------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    def in_flight(self, upstream: Upstream | None = None) -> int:
        if upstream is not None:
            return len(self._flights[id(upstream)])
        return sum(len(f) for f in self._flights.values())

    @property
    def ready(self) -> bool:
        return any(u.ready for u in self.upstreams)

    def largest_batch(self) -> int:
        """The most samples one request may carry: what the biggest ready upstream takes."""
        sizes = [u.max_batch_size for u in self.upstreams if u.ready]
        return max(sizes, default=self.max_batch_size)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    def notify(self) -> None:
        """Something changed outside (an upstream's readiness or limits): look again."""
        self._wakeup.set()

    async def drain(self, timeout: float) -> None:
        """Refuse new requests; let queued and in-flight ones finish within ``timeout``."""
        self.draining = True
        end = monotonic() + timeout
        while (self._queue or self._tasks) and monotonic() < end:
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop dispatching; whatever is still waiting gets 503."""
        self.draining = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        self._fail_queued(Unavailable("the proxy is shutting down", retry_after=1))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- callers -----------------------------------------------------------------------

    async def submit(self, part: bytes, n: int, timeout: float, request_id: str = "") -> Reply:
        """Queue ``n`` samples (encoded as ``part``) and wait for their outputs.

        Raises a ``ServingError``: 429 when the queue is full, 503 when no upstream is
        ready or the proxy is draining, 413 when the request is larger than any batch
        an upstream takes, 504 past ``timeout`` seconds, or the upstream's own error.
        The reply's ``outputs`` are this request's ``n`` outputs.
        """
        if self.draining:
            raise Unavailable("the proxy is shutting down", retry_after=1)
        if not self.ready:
            raise Unavailable("no model server is ready", retry_after=1)
        if n > self.max_batch_size and n > self.largest_batch():
            raise PayloadTooLarge(
                f"{n} samples in one request; the model server takes at most "
                f"{self.largest_batch()} per batch"
            )
        if self._full(len(part)) and self._left:
            self._purge()  # callers that left still hold their places until purged
        if len(self._queue) >= self.max_queue:
            raise QueueFull(f"the queue is full ({self.max_queue} requests)", retry_after=1)
        if self._full(len(part)):
            raise QueueFull(
                f"the queue is full ({self.max_queue_bytes} bytes waiting)", retry_after=1
            )
        now = monotonic()
        future = asyncio.get_running_loop().create_future()
        request = Request(part, n, now + timeout, request_id, future, now)
        self._queue.append(request)
        self._queued_bytes += request.nbytes
        self._wakeup.set()
        try:
            async with asyncio.timeout(timeout):
                return await request.future
        except TimeoutError:
            self._left += 1
            raise GatewayTimeout(f"no answer within {timeout:g} s") from None
        except asyncio.CancelledError:
            self._left += 1
            raise

    def _full(self, size: int) -> bool:
        return (
            len(self._queue) >= self.max_queue
            or self._queued_bytes + size + 1 > self.max_queue_bytes
        )

    def _purge(self) -> None:
        """Forget queued requests whose callers left (timed out, hung up)."""
        self._queue = deque(r for r in self._queue if not r.future.done())
        self._queued_bytes = sum(r.nbytes for r in self._queue)
        self._left = 0

    # -- dispatch ----------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wakeup.clear()
            now = monotonic()
            try:
                when = self._dispatch(now)
            except Exception:  # a bug must fail the waiting callers, never stop dispatching
                log.exception("the batcher's dispatch failed")
                self._fail_queued(ServingError("internal error in the proxy's batcher"))
                when = None
            timer = None
            if when is not None:  # the loop's clock may be coarse (uvloop: 1 ms): go relative
                timer = loop.call_later(max(0.0, when - now), self._wakeup.set)
            await self._wakeup.wait()
            if timer is not None:
                timer.cancel()

    def _dispatch(self, now: float) -> float | None:
        """Send what should leave now; return when to look again (None: on the next event)."""
        while True:
            self._drop_gone(now)
            if not self._queue:
                return None
            if not self.ready:
                self._fail_queued(Unavailable("no model server is ready", retry_after=1))
                return None
            upstream = self._free_upstream()
            if upstream is None:
                return None  # every slot is busy: the batch grows; a finish wakes us
            hold_until = self._hold_until(upstream, now)
            if hold_until is not None and hold_until > now:
                return hold_until
            batch = self._take(upstream, now)
            if batch:
                self._launch(upstream, batch, now)

    def _drop_gone(self, now: float) -> None:
        """Pop requests at the head whose caller left or whose deadline passed."""
        queue = self._queue
        while queue and (queue[0].future.done() or queue[0].deadline <= now):
            request = queue.popleft()
            self._queued_bytes -= request.nbytes
            if not request.future.done():
                request.future.set_exception(GatewayTimeout("the request's deadline passed"))

    def _free_upstream(self) -> Upstream | None:
        best, best_load = None, None
        for upstream in self.upstreams:
            if not upstream.ready:
                continue
            busy = len(self._flights[id(upstream)])
            if busy >= upstream.max_concurrency:
                continue
            load = busy / upstream.max_concurrency
            if best_load is None or load < best_load:
                best, best_load = upstream, load
        return best

    def _limit(self, upstream: Upstream) -> int:
        return max(1, min(self.max_batch_size, upstream.max_batch_size))

    def _hold_until(self, upstream: Upstream, now: float) -> float | None:
        """When the head batch should leave for ``upstream`` (None or <= now: at once)."""
        flights = self._flights[id(upstream)]
        if not flights:
            return None  # the upstream is idle: never make the device wait
        limit = self._limit(upstream)
        samples = 0
        earliest_deadline = None
        for request in self._queue:
            if request.future.done():
                continue
            samples += request.n
            if earliest_deadline is None or request.deadline < earliest_deadline:
                earliest_deadline = request.deadline
            if samples >= limit:
                return None  # a full batch is waiting
        oldest = self._queue[0].enqueued
        # the upstream is busy until its running batch ends; ours would only wait there
        busy_until = min(f.started + f.predicted for f in flights.values())
        cost = self.cost.predict(min(samples + 1, limit))
        margin = _margin(cost)  # time to encode, send and decode before the device frees
        hold = min(oldest + self.max_wait_s, busy_until - margin)
        if earliest_deadline is not None and self.cost.known:
            hold = min(hold, earliest_deadline - cost - margin)
        return hold

    def _take(self, upstream: Upstream, now: float) -> list[Request]:
        """Pop the head batch for ``upstream``: FIFO, within its sample and byte limits.

        With a learnt cost, the batch also stops growing before it would finish after the
        deadline of any request in it (a late arrival must not make an earlier caller with
        a tight deadline miss it), and a request that would be late even alone is shed,
        unless the upstream is idle: then it goes anyway, since trying costs nobody
        anything and a finished batch is the only thing that corrects a stale cost.
        """
        limit = self._limit(upstream)
        byte_limit = upstream.max_body_bytes - _ENVELOPE_BYTES
        predictable = self.cost.known
        may_shed = predictable and bool(self._flights[id(upstream)])
        batch: list[Request] = []
        samples = size = 0
        deadline = float("inf")  # the earliest deadline in the batch
        queue = self._queue
        while queue:
            request = queue[0]
            if request.future.done():
                queue.popleft()
                self._queued_bytes -= request.nbytes
                continue
            if batch and (samples + request.n > limit or size + request.nbytes > byte_limit):
                break
            if batch and predictable:
                cost = self.cost.predict(samples + request.n)
                if now + cost + _margin(cost) > min(deadline, request.deadline):
                    break  # it goes in the next batch, which leaves sooner than this grows
            queue.popleft()
            self._queued_bytes -= request.nbytes
            if request.n > upstream.max_batch_size or request.nbytes > byte_limit:
                request.future.set_exception(
                    PayloadTooLarge(
                        f"{request.n} samples ({request.nbytes} bytes encoded) exceed what "
                        f"{upstream.name} takes in one batch ({upstream.max_batch_size} "
                        f"samples, {upstream.max_body_bytes} bytes)"
                    )
                )
                continue
            if may_shed and now + self.cost.predict(request.n) > request.deadline:
                request.future.set_exception(
                    GatewayTimeout("the request would finish after its deadline; shed")
                )
                continue
            batch.append(request)
            samples += request.n
            size += request.nbytes
            deadline = min(deadline, request.deadline)
            if samples >= limit or request.n > self.max_batch_size:
                break
        return batch

    def _launch(self, upstream: Upstream, batch: list[Request], now: float) -> None:
        samples = sum(r.n for r in batch)
        flight_id = next(self._flight_ids)
        self._flights[id(upstream)][flight_id] = _Flight(now, self.cost.predict(samples))
        task = asyncio.get_running_loop().create_task(
            self._run_batch(upstream, batch, samples, flight_id, now)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_batch(
        self, upstream: Upstream, batch: list[Request], samples: int, flight_id: int, now: float
    ) -> None:
        status = 200
        try:
            status = await self._deliver(upstream, batch)
        except asyncio.CancelledError:
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(Unavailable("the proxy is shutting down"))
            raise
        except Exception as exc:  # a bug must fail its callers, never hang them
            status = 500
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(
                        UpstreamError(f"the batch failed: {type(exc).__name__}")
                    )
        finally:
            round_trip = monotonic() - now
            self._flights[id(upstream)].pop(flight_id, None)
            if status == 200:
                self.cost.observe(samples, round_trip)
            self._wakeup.set()
            if self._observer is not None:
                self._observer.batch_done(
                    BatchRecord(
                        upstream=upstream.name,
                        requests=len(batch),
                        samples=samples,
                        wait_s=now - min(r.enqueued for r in batch),
                        round_trip_s=round_trip,
                        status=status,
                        request_ids=tuple(r.request_id for r in batch),
                        waits_s=tuple(now - r.enqueued for r in batch),
                    )
                )

    async def _deliver(self, upstream: Upstream, batch: list[Request]) -> int:
        """Send ``batch``; on a failure one sample could cause, bisect. Returns the status."""
        live = [r for r in batch if not r.future.done()]
        if not live:
            return 200
        timeout = max(r.deadline for r in live) - monotonic()
        if timeout <= 0:
            for request in live:
                if not request.future.done():
                    request.future.set_exception(GatewayTimeout("the request's deadline passed"))
            return 504
        n = sum(r.n for r in live)
        try:
            reply = await upstream.send(
                [r.part for r in live], n, [r.request_id for r in live], timeout
            )
        except BatchFailed as failed:
            if failed.split and len(live) > 1:
                half = len(live) // 2
                first = await self._deliver(upstream, live[:half])
                second = await self._deliver(upstream, live[half:])
                return first if first != 200 else second
            if failed.requeue and not self.draining:
                self._requeue(live)
                return failed.error.status
            for request in live:
                if not request.future.done():
                    request.future.set_exception(failed.error)
            return failed.error.status
        if len(reply.outputs) != n:
            error = UpstreamError(f"the model server answered {len(reply.outputs)} outputs for {n}")
            for request in live:
                if not request.future.done():
                    request.future.set_exception(error)
            return 502
        start = 0
        for request in live:
            if not request.future.done():
                outputs = reply.outputs[start : start + request.n]
                request.future.set_result(Reply(outputs, reply.model))
            start += request.n
        return 200

    def _requeue(self, requests: list[Request]) -> None:
        """Put a batch that never reached its upstream back at the head of the queue."""
        for request in reversed(requests):
            if not request.future.done():
                self._queue.appendleft(request)
                self._queued_bytes += request.nbytes
        self._wakeup.set()

    def _fail_queued(self, error: ServingError) -> None:
        while self._queue:
            request = self._queue.popleft()
            if not request.future.done():
                request.future.set_exception(error)
        self._queued_bytes = 0
