"""The device queue: batches in, outputs out, one at a time on the device, off the event loop.

One worker thread owns the device: it takes jobs from a bounded queue and runs their
forward passes under ``device_lock`` (which a reload's warm-up also takes), so batches
never interleave on the device. The event loop only enqueues and awaits a future, so
``/health`` answers while a long batch runs. A full queue is refused at once with 503
and ``Retry-After`` rather than growing without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from nexus_cli.serving import InvalidInput, ServingError, Unavailable

from model_server.loading import ForwardError, LoadedModel

log = logging.getLogger("model_server.runner")

#: ``observe(samples, seconds)``: called by the worker after each job's forward passes
Observer = Callable[[int, float], None]


@dataclass
class _Job:
    model: LoadedModel
    arrays: list[np.ndarray]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    queued_at: float


@dataclass(frozen=True)
class Ran:
    """A job's outputs (one array per input array) and where its time went."""

    outputs: list[np.ndarray]
    queue_seconds: float
    forward_seconds: float


_STOP = object()


class DeviceRunner:
    """Runs jobs (a model and its same-shape groups) on one worker thread, in order."""

    def __init__(self, max_queue: int, observe: Observer | None = None) -> None:
        self.device_lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._observe = observe or (lambda _samples, _seconds: None)
        self._thread = threading.Thread(target=self._work, name="nexus-device", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Jobs waiting for the device (not counting the one running)."""
        return self._queue.qsize()

    async def run(self, model: LoadedModel, arrays: list[np.ndarray]) -> Ran:
        """One output array per input array, computed by ``model`` on the worker thread."""
        loop = asyncio.get_running_loop()
        job = _Job(model, arrays, loop.create_future(), loop, time.perf_counter())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Unavailable(
                f"{self._queue.maxsize} batches are already waiting for the device "
                "(NEXUS_SERVER_QUEUE); retry shortly",
                code="queue_full",
                retry_after=1,
            ) from None
        return await job.future

    def close(self, timeout: float = 10) -> None:
        """Finish the queued jobs, then stop the worker."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            try:
                with self.device_lock:
                    started = time.perf_counter()
                    outputs = [job.model.forward(array) for array in job.arrays]
                    seconds = time.perf_counter() - started
                self._observe(sum(len(a) for a in job.arrays), seconds)
                self._resolve(job, Ran(outputs, started - job.queued_at, seconds), None)
            except BaseException as exc:  # noqa: BLE001 - every failure goes to its caller
                self._resolve(job, None, _serving_error(exc, job.model))
            # idle, the worker must not keep the last job's model alive: after a swap that
            # would pin the old weights until the next request
            del job

    @staticmethod
    def _resolve(job: _Job, result: object, error: BaseException | None) -> None:
        def settle() -> None:
            if job.future.done():  # the caller went away
                return
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)

        with contextlib.suppress(RuntimeError):  # a closed loop: the server is shutting down
            job.loop.call_soon_threadsafe(settle)


def _serving_error(exc: BaseException, model: LoadedModel) -> ServingError:
    """What the caller of a failed forward pass is told."""
    if isinstance(exc, torch.OutOfMemoryError):
        log.warning("out of memory on %s during a batch", model.device)
        return Unavailable(
            f"the device ({model.device}) ran out of memory for this batch; "
            "retry with fewer samples",
            code="device_out_of_memory",
            retry_after=1,
        )
    if isinstance(exc, ForwardError):
        if not model.signature_known:
            # no signature to check against: a failure is most likely the input's shape
            return InvalidInput(
                f"the model could not run on these inputs: {exc}", code="model_error"
            )
        log.error("model %s failed on a checked batch: %s", model.describe(), exc)
        error = ServingError(f"the model failed on this batch: {exc}", code="model_error")
        return error
    log.exception("unexpected failure on the device worker", exc_info=exc)
    return ServingError("internal error while running the model")
