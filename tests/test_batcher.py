"""The batcher on its own: plain asyncio, a fake upstream, concurrent callers by gather."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import pytest

from nexus_cli.serving import (
    GatewayTimeout,
    InvalidInput,
    PayloadTooLarge,
    QueueFull,
    Unavailable,
    UpstreamError,
)
from proxy.batcher import Batcher, BatchFailed, BatchRecord, CostModel, Reply

MODEL = {"name": "fake", "commit_hash": "c0ffee"}


def part(*samples: float) -> bytes:
    """One request's encoded samples, as the routes encode them: the inside of a list."""
    return json.dumps(list(samples)).encode()[1:-1]


class FakeUpstream:
    """An upstream whose model doubles each sample; negative samples make it fail."""

    def __init__(
        self,
        name: str = "fake",
        *,
        max_concurrency: int = 2,
        max_batch_size: int = 1024,
        max_body_bytes: int = 1 << 20,
        delay: float = 0.0,
        per_sample: float = 0.0,
    ) -> None:
        self.name = name
        self.ready = True
        self.max_concurrency = max_concurrency
        self.max_batch_size = max_batch_size
        self.max_body_bytes = max_body_bytes
        self.delay = delay
        self.per_sample = per_sample
        self.gate: asyncio.Event | None = None  # set: the model answers; unset: it hangs
        self.hold_first: asyncio.Event | None = None  # like gate, for the first batch only
        self.batches: list[list[float]] = []
        self.running = 0
        self.most_running = 0
        self.refuse_connection = False
        self.wrong_count = False
        self.request_ids: list[str] = []

    async def send(
        self, parts: Sequence[bytes], n: int, request_ids: Sequence[str], timeout: float
    ) -> Reply:
        if self.refuse_connection:
            self.ready = False
            raise BatchFailed(Unavailable(f"{self.name} refused the connection"), requeue=True)
        samples = json.loads(b"[" + b",".join(parts) + b"]")
        assert len(samples) == n
        assert len(request_ids) == len(parts)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.hold_first is not None:
                gate, self.hold_first = self.hold_first, None
                await gate.wait()
            await asyncio.sleep(self.delay + self.per_sample * n)
        finally:
            self.running -= 1
        self.batches.append(samples)
        self.request_ids.extend(request_ids)
        bad = [i for i, x in enumerate(samples) if x < 0]
        if bad:
            raise BatchFailed(InvalidInput(f"inputs[{bad[0]}]: negative"), split=True)
        outputs = [2 * x for x in samples]
        if self.wrong_count:
            outputs = outputs[:-1]
        return Reply(outputs, MODEL)


class Records:
    def __init__(self) -> None:
        self.batches: list[BatchRecord] = []

    def batch_done(self, record: BatchRecord) -> None:
        self.batches.append(record)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def started(upstreams, **kwargs) -> Batcher:
    batcher = Batcher(upstreams, **kwargs)
    batcher.start()
    return batcher


def test_each_caller_gets_its_own_result_and_batches_form() -> None:
    async def main():
        fake = FakeUpstream(max_concurrency=1, delay=0.005)
        records = Records()
        batcher = await started([fake], max_batch_size=8, observer=records)
        results = await asyncio.gather(
            *(batcher.submit(part(i), 1, 10, f"r{i}") for i in range(200))
        )
        await batcher.stop()
        return fake, records, results

    fake, records, results = run(main())
    assert [r.outputs for r in results] == [[2 * i] for i in range(200)]
    assert all(r.model == MODEL for r in results)
    sizes = [len(b) for b in fake.batches]
    assert sum(sizes) == 200
    assert max(sizes) == 8  # batches formed while the one slot was busy, never above the max
    assert fake.most_running == 1
    assert sorted(fake.request_ids) == sorted(f"r{i}" for i in range(200))
    assert sum(r.samples for r in records.batches) == 200
    assert all(r.status == 200 for r in records.batches)


def test_several_batches_in_flight_up_to_the_upstream_limit() -> None:
    async def main():
        fake = FakeUpstream(max_concurrency=3, delay=0.02)
        batcher = await started([fake], max_batch_size=4)
        await asyncio.gather(*(batcher.submit(part(i), 1, 10) for i in range(60)))
        await batcher.stop()
        return fake

    fake = run(main())
    assert fake.most_running == 3


def test_a_lone_request_is_not_held_for_the_window() -> None:
    async def main():
        fake = FakeUpstream()
        batcher = await started([fake], max_wait_s=30)
        loop = asyncio.get_running_loop()
        begin = loop.time()
        reply = await batcher.submit(part(21), 1, 60)
        elapsed = loop.time() - begin
        await batcher.stop()
        return reply, elapsed

    reply, elapsed = run(main())
    assert reply.outputs == [42]
    assert elapsed < 10  # a 30 s window would have held it; this bound only catches that


def test_multi_row_request_counts_as_its_rows_and_a_large_one_goes_alone() -> None:
    async def main():
        fake = FakeUpstream(max_concurrency=1, delay=0.01, max_batch_size=64)
        batcher = await started([fake], max_batch_size=4)
        replies = await asyncio.gather(
            batcher.submit(part(1, 2, 3), 3, 10),
            batcher.submit(part(4, 5), 2, 10),
            batcher.submit(part(*range(10)), 10, 10),  # above 4: alone, the server takes 64
            batcher.submit(part(7), 1, 10),
        )
        with pytest.raises(PayloadTooLarge):
            await batcher.submit(part(*range(65)), 65, 10)  # above the server's 64
        await batcher.stop()
        return fake, replies

    fake, replies = run(main())
    assert replies[0].outputs == [2, 4, 6]
    assert replies[1].outputs == [8, 10]
    assert replies[2].outputs == [2 * i for i in range(10)]
    assert replies[3].outputs == [14]
    assert all(len(b) <= 4 or len(b) == 10 for b in fake.batches)
    assert [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] in [[int(x) for x in b] for b in fake.batches]


def test_a_bad_sample_fails_only_its_own_caller() -> None:
    async def main():
        fake = FakeUpstream(max_concurrency=1, delay=0.01)
        batcher = await started([fake], max_batch_size=16)
        values = [float(i) for i in range(40)]
        values[13] = -1.0
        results = await asyncio.gather(
            *(batcher.submit(part(v), 1, 10) for v in values), return_exceptions=True
        )
        await batcher.stop()
        return values, results, fake

    values, results, fake = run(main())
    for value, result in zip(values, results, strict=True):
        if value < 0:
            assert isinstance(result, InvalidInput)
            assert result.status == 422
        else:
            assert result.outputs == [2 * value]
    assert any(len(b) > 1 and -1.0 in b for b in fake.batches)  # it was batched, then split


def test_result_count_is_checked() -> None:
    async def main():
        fake = FakeUpstream()
        fake.wrong_count = True
        batcher = await started([fake])
        with pytest.raises(UpstreamError, match="outputs for"):
            await batcher.submit(part(1, 2), 2, 10)
        await batcher.stop()

    run(main())


def test_full_queue_is_refused_at_once_with_retry_after() -> None:
    async def main():
        fake = FakeUpstream(max_concurrency=1)
        fake.gate = asyncio.Event()
        batcher = await started([fake], max_batch_size=1, max_queue=4)
        waiting = [asyncio.ensure_future(batcher.submit(part(0), 1, 30))]
        await asyncio.sleep(0.02)  # in flight, held at the gate
        waiting += [asyncio.ensure_future(batcher.submit(part(i), 1, 30)) for i in range(1, 5)]
        await asyncio.sleep(0.02)
        assert batcher.queue_depth == 4
        with pytest.raises(QueueFull) as refused:
            await batcher.submit(part(99), 1, 30)
        assert refused.value.status == 429
        assert refused.value.headers()["Retry-After"] == "1"
        fake.gate.set()
        replies = await asyncio.gather(*waiting)
        await batcher.stop()
        return replies

    assert [r.outputs for r in run(main())] == [[2 * i] for i in range(5)]


def test_queue_is_bounded_in_bytes_too() -> None:
    async def main():
        fake = FakeUpstream(max_concurrency=1)
        fake.gate = asyncio.Event()
        batcher = await started([fake], max_batch_size=1, max_queue_bytes=100)
        first = asyncio.ensure_future(batcher.submit(part(0), 1, 30))
        await asyncio.sleep(0.02)
        second = asyncio.ensure_future(batcher.submit(part(*range(20)), 20, 30))
        await asyncio.sleep(0.02)
        with pytest.raises(QueueFull, match="bytes"):
            await batcher.submit(part(*range(30)), 30, 30)
        fake.gate.set()
        await asyncio.gather(first, second)
        await batcher.stop()

    run(main())


def test_timeout_gives_504_and_a_caller_that_leaves_harms_no_one() -> None:
    async def main():
        fake = FakeUpstream(max_concurrency=1)
        fake.gate = asyncio.Event()
        batcher = await started([fake], max_batch_size=8)
        blocker = asyncio.ensure_future(batcher.submit(part(0), 1, 30))
        await asyncio.sleep(0.02)
        with pytest.raises(GatewayTimeout):
            await batcher.submit(part(1), 1, 0.1)  # queued behind the gate: times out
        leaving = asyncio.ensure_future(batcher.submit(part(2), 1, 30))
        staying = asyncio.ensure_future(batcher.submit(part(3), 1, 30))
        await asyncio.sleep(0.02)
        leaving.cancel()  # the caller disconnected
        fake.gate.set()
        results = await asyncio.gather(blocker, staying)
        await batcher.stop()
        return results, fake

    results, fake = run(main())
    assert [r.outputs for r in results] == [[0], [6]]
    assert all(1.0 not in b and 2.0 not in b for b in fake.batches)


def test_a_refused_batch_goes_to_another_replica() -> None:
    async def main():
        down = FakeUpstream("down", max_concurrency=4)
        up = FakeUpstream("up", max_concurrency=1, delay=0.01)
        down.refuse_connection = True
        batcher = await started([down, up], max_batch_size=4)
        replies = await asyncio.gather(*(batcher.submit(part(i), 1, 10) for i in range(20)))
        await batcher.stop()
        return replies, down, up

    replies, down, up = run(main())
    assert [r.outputs for r in replies] == [[2 * i] for i in range(20)]
    assert not down.batches
    assert sum(len(b) for b in up.batches) == 20


def test_no_ready_upstream_is_503_at_once() -> None:
    async def main():
        fake = FakeUpstream()
        fake.ready = False
        batcher = await started([fake])
        with pytest.raises(Unavailable) as refused:
            await batcher.submit(part(1), 1, 10)
        await batcher.stop()
        return refused.value

    error = run(main())
    assert error.status == 503
    assert "Retry-After" in error.headers()


def test_the_only_replica_going_down_fails_its_queue_fast() -> None:
    async def main():
        fake = FakeUpstream(max_concurrency=1)
        fake.gate = asyncio.Event()
        batcher = await started([fake], max_batch_size=1)
        waiting = [asyncio.ensure_future(batcher.submit(part(i), 1, 30)) for i in range(3)]
        await asyncio.sleep(0.02)
        fake.ready = False
        batcher.notify()
        queued = await asyncio.gather(*waiting[1:], return_exceptions=True)
        fake.gate.set()
        first = await waiting[0]
        await batcher.stop()
        return queued, first

    queued, first = run(main())
    assert all(isinstance(e, Unavailable) for e in queued)
    assert first.outputs == [0]


def test_batches_respect_the_upstream_byte_limit() -> None:
    async def main():
        fake = FakeUpstream(max_concurrency=1, delay=0.01, max_body_bytes=64 + 40)
        batcher = await started([fake], max_batch_size=32)
        replies = await asyncio.gather(*(batcher.submit(part(1000 + i), 1, 10) for i in range(30)))
        await batcher.stop()
        return replies, fake

    replies, fake = run(main())
    assert [r.outputs for r in replies] == [[2 * (1000 + i)] for i in range(30)]
    assert max(len(b) for b in fake.batches) <= 8  # 5 bytes per sample in 40


def test_requests_predicted_to_miss_their_deadline_are_shed() -> None:
    async def main():
        fake = FakeUpstream(max_concurrency=2)
        gate = fake.hold_first = asyncio.Event()
        batcher = await started([fake])
        for n in (1, 2, 4, 8):
            batcher.cost.observe(n, 5.0 * n)  # learnt: a batch costs seconds
        busy = asyncio.ensure_future(batcher.submit(part(0), 1, 30))
        await asyncio.sleep(0.02)  # in flight: the upstream is not idle
        with pytest.raises(GatewayTimeout, match="shed"):
            await batcher.submit(part(1), 1, 1.0)
        gate.set()
        await busy
        await batcher.stop()
        return fake

    assert [b for b in run(main()).batches if 1.0 in b] == []  # never sent


def test_a_stale_cost_does_not_shed_forever() -> None:
    """A model that was slow once and is fast again: requests with deadlines shorter than
    the old cost are served (an idle upstream is tried), and the cost is learnt anew."""

    async def main():
        fake = FakeUpstream(max_concurrency=1)
        batcher = await started([fake])
        for n in (1, 2, 4):
            batcher.cost.observe(n, 0.5 * n)  # what it learnt while the model was slow
        replies = [await batcher.submit(part(i), 1, 0.2) for i in range(8)]
        await batcher.stop()
        return replies, batcher.cost

    replies, cost = run(main())
    assert [r.outputs for r in replies] == [[2 * i] for i in range(8)]
    assert cost.predict(1) < 0.5


def test_a_late_arrival_does_not_push_an_earlier_caller_past_its_deadline() -> None:
    async def main():
        fake = FakeUpstream(max_concurrency=1, delay=0.005, per_sample=0.02)
        gate = fake.hold_first = asyncio.Event()
        batcher = await started([fake], max_batch_size=32)
        for n in (1, 8, 32):
            batcher.cost.observe(n, 0.005 + 0.02 * n)  # learnt: batch-32 takes 0.645 s
        busy = asyncio.ensure_future(batcher.submit(part(100), 1, 30))
        await asyncio.sleep(0.02)  # the upstream's only slot is busy: the rest queue up
        tight = asyncio.ensure_future(batcher.submit(part(0), 1, 0.5))
        relaxed = [asyncio.ensure_future(batcher.submit(part(i), 1, 30)) for i in range(1, 32)]
        await asyncio.sleep(0.01)
        gate.set()
        reply = await tight  # in a batch small enough to finish within its 0.5 s
        others = await asyncio.gather(busy, *relaxed)
        await batcher.stop()
        return reply, others, fake

    reply, others, fake = run(main())
    assert reply.outputs == [0]
    assert [r.outputs for r in others] == [[200]] + [[2 * i] for i in range(1, 32)]
    assert len(fake.batches[1]) < 32


def test_callers_that_left_do_not_hold_queue_places() -> None:
    async def main():
        fake = FakeUpstream(max_concurrency=1)
        fake.gate = asyncio.Event()
        batcher = await started([fake], max_batch_size=1, max_queue=4)
        busy = asyncio.ensure_future(batcher.submit(part(0), 1, 30))
        await asyncio.sleep(0.02)
        leaving = [asyncio.ensure_future(batcher.submit(part(i), 1, 30)) for i in (1, 2, 3)]
        with pytest.raises(GatewayTimeout):
            await batcher.submit(part(4), 1, 0.05)  # the fourth place, then gone
        await asyncio.sleep(0.01)
        for caller in leaving:
            caller.cancel()  # hung up
        await asyncio.sleep(0.01)
        staying = [asyncio.ensure_future(batcher.submit(part(i), 1, 30)) for i in (5, 6, 7, 8)]
        await asyncio.sleep(0.01)
        fake.gate.set()
        replies = await asyncio.gather(busy, *staying)
        await batcher.stop()
        return replies, fake

    replies, fake = run(main())
    assert [r.outputs for r in replies] == [[0], [10], [12], [14], [16]]
    assert sorted(b[0] for b in fake.batches) == [0, 5, 6, 7, 8]


def test_a_bug_in_dispatch_fails_the_waiting_callers_and_dispatch_goes_on() -> None:
    class Flaky(FakeUpstream):
        broken = True

        @property
        def max_batch_size(self) -> int:
            if self.broken:
                raise AttributeError("'str' object has no attribute 'get'")
            return 1024

        @max_batch_size.setter
        def max_batch_size(self, value: int) -> None:
            pass

    async def main():
        fake = Flaky()
        batcher = await started([fake], max_batch_size=4)
        failed = await asyncio.gather(
            *(batcher.submit(part(i), 1, 5) for i in range(3)), return_exceptions=True
        )
        fake.broken = False
        reply = await batcher.submit(part(7), 1, 5)
        await batcher.stop()
        return failed, reply

    failed, reply = run(main())
    assert [type(e).__name__ for e in failed] == ["ServingError"] * 3
    assert all(e.status == 500 for e in failed)
    assert reply.outputs == [14]


def test_draining_refuses_new_requests_and_finishes_the_rest() -> None:
    async def main():
        fake = FakeUpstream(max_concurrency=1, delay=0.05)
        batcher = await started([fake], max_batch_size=2)
        waiting = [asyncio.ensure_future(batcher.submit(part(i), 1, 30)) for i in range(6)]
        await asyncio.sleep(0.01)
        drained = asyncio.ensure_future(batcher.drain(10))
        await asyncio.sleep(0)
        with pytest.raises(Unavailable, match="shutting down"):
            await batcher.submit(part(9), 1, 30)
        await drained
        results = await asyncio.gather(*waiting)
        await batcher.stop()
        return results

    assert [r.outputs for r in run(main())] == [[2 * i] for i in range(6)]


def test_cost_model_fits_a_line() -> None:
    cost = CostModel(window=50)
    assert cost.predict(8) == 0.0
    for n in (1, 2, 4, 8, 16, 32):
        cost.observe(n, 0.002 * n + 0.010)
    assert cost.known
    assert cost.predict(64) == pytest.approx(0.138)
    assert cost.predict(1) == pytest.approx(0.012)


def test_cost_model_with_one_size_predicts_its_mean() -> None:
    cost = CostModel()
    for duration in (0.01, 0.03):
        cost.observe(4, duration)
    assert cost.predict(100) == pytest.approx(0.02)


def test_while_a_batch_runs_the_next_one_gathers_company_within_the_window() -> None:
    async def main():
        fake = FakeUpstream(max_concurrency=2)
        gate = fake.hold_first = asyncio.Event()
        records = Records()
        batcher = await started([fake], max_batch_size=32, max_wait_s=0.3, observer=records)
        for n in (1, 8, 16, 32):
            batcher.cost.observe(n, 5.0 + 0.01 * n)  # learnt: a batch runs for seconds
        running = asyncio.ensure_future(batcher.submit(part(0.5), 1, 30))
        await asyncio.sleep(0.02)  # in flight, held at the gate: the upstream is busy
        later = []
        for i in range(5):  # arrive one by one while the other batch runs
            later.append(asyncio.ensure_future(batcher.submit(part(i), 1, 30)))
            await asyncio.sleep(0.01)
        # the window (0.3 s) ends long before the running batch (predicted 5 s): they
        # leave together when it does, without waiting for the running batch
        replies = await asyncio.wait_for(asyncio.gather(*later), 5)
        gate.set()
        await running
        await batcher.stop()
        return replies, records

    replies, records = run(main())
    assert [r.outputs for r in replies] == [[2 * i] for i in range(5)]
    together = [r for r in records.batches if r.samples == 5]
    assert len(together) == 1
    assert together[0].wait_s >= 0.2  # it waited for company (the window, not the toll)
