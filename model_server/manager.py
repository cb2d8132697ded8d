"""Which model serves, how it got there, and swapping it for a newer one without downtime.

The first load runs in the background while the server already answers ``/health`` and
``/readyz`` (503 until ready). A reload (``POST /admin/reload`` or SIGHUP) loads the new
version beside the old one on a worker thread, warms it up, and swaps one reference:
requests decoded before the swap finish on the old model, later ones use the new one.
Reloads are serialised by a lock: a second reload waits for the first, then finds the
version it loaded already serving and answers without loading anything.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import traceback
from dataclasses import dataclass

from nexus_cli.serving import ServingError

from model_server.loading import LoadedModel, LoadError, load_latest
from model_server.memory import return_free_memory, return_memory_when_freed
from model_server.metrics import Metrics
from model_server.runner import DeviceRunner
from model_server.settings import Settings

log = logging.getLogger("model_server")

STEPS = ("metadata", "weights", "load", "warmup")


class ReloadFailed(ServingError):
    """A reload that did not swap: the old model (if any) keeps serving.

    502 when the object store failed or holds other bytes than recorded, 503 when the
    device ran out of memory, 409 when the recorded latest version cannot be served (bad
    metadata, unknown model, refused format, factory or signature trouble).
    """

    type = "reload_error"
    code = "reload_failed"

    def __init__(self, message: str, cause: str) -> None:
        super().__init__(message, retry_after=5 if cause == "device" else None)
        self.status = {"store": 502, "device": 503}.get(cause, 409)


@dataclass(frozen=True)
class ReloadResult:
    from_commit: str | None
    to_commit: str
    model: str
    changed: bool


class ModelManager:
    def __init__(self, settings: Settings, runner: DeviceRunner, metrics: Metrics) -> None:
        self.settings = settings
        self.runner = runner
        self.metrics = metrics
        self.model: LoadedModel | None = None
        self.state = "loading"  # loading | ready | failed
        self.reason = "the model is loading"
        self.checks: dict[str, str] = dict.fromkeys(STEPS, "pending")
        self.last_reload: str | None = None
        self._lock = asyncio.Lock()

    # readiness -----------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.model is not None

    def readiness(self) -> dict[str, object]:
        checks = dict(self.checks)
        if self.model is not None:
            checks["model"] = f"serving {self.model.describe()}"
        else:
            checks["model"] = self.reason
        if self.last_reload is not None:
            checks["last_reload"] = self.last_reload
        # ready | loading | failed (the last two with 503)
        return {"status": "ready" if self.ready else self.state, "checks": checks}

    # loading -------------------------------------------------------------------------

    async def initial_load(self) -> None:
        """The start-up load; a failure is logged and shown in /readyz, never raised."""
        try:
            await self.reload("start-up")
        except ReloadFailed:
            pass  # already logged, and /readyz says why
        except Exception:  # noqa: BLE001 - the process must stay up and say why
            log.exception("start-up failed unexpectedly")
            self.state, self.reason = "failed", "start-up failed unexpectedly; see the log"

    async def reload(self, trigger: str) -> ReloadResult:
        """Load the latest version if it is not the one serving; swap it in atomically."""
        async with self._lock:
            return await self._reload(trigger)

    async def _reload(self, trigger: str) -> ReloadResult:
        current = self.model
        steps: dict[str, str] = dict.fromkeys(STEPS, "pending")
        if current is None:
            self.checks, self.state, self.reason = steps, "loading", "the model is loading"

        def report(step: str, ok: bool, detail: str, seconds: float) -> None:
            steps[step] = f"{'ok' if ok else 'failed'} in {seconds:.2f} s: {detail}"
            self.metrics.load_seconds.labels(step).set(seconds)
            level = logging.INFO if ok else logging.ERROR
            log.log(level, "%s: %s %s in %.3f s: %s",
                    trigger, step, "ok" if ok else "FAILED", seconds, detail)  # fmt: skip

        try:
            result = await asyncio.to_thread(
                load_latest,
                self.settings,
                report,
                self.runner.device_lock,
                current=current.record if current else None,
            )
        except LoadError as exc:
            self.metrics.reloads.labels("failed").inc()
            _forget_locals(exc)  # the failed load's finished frames hold what it loaded
            await asyncio.to_thread(return_free_memory)
            why = f"{exc.step} failed: {exc.message}"
            if current is None:
                self.state, self.reason = "failed", why
                raise ReloadFailed(f"no model is serving: {why}", exc.cause) from None
            self.last_reload = f"failed ({trigger}): {why}; still serving {current.describe()}"
            log.error("%s: reload failed, still serving %s", trigger, current.describe())
            raise ReloadFailed(
                f"reload failed, still serving {current.describe()}: {why}", exc.cause
            ) from None

        if not isinstance(result, LoadedModel):  # the latest version is already serving
            assert current is not None
            self.metrics.reloads.labels("unchanged").inc()
            self.last_reload = f"unchanged ({trigger}): {current.describe()} is the latest"
            log.info("%s: %s is still the latest version", trigger, current.describe())
            return ReloadResult(current.commit_hash, current.commit_hash, current.name, False)

        self.model = result  # the swap: one reference, atomic for every reader
        self.checks, self.state = steps, "ready"
        self.metrics.serving(result.name, result.commit_hash, result.format, str(result.device))
        self.metrics.reloads.labels("swapped").inc()
        from_commit = current.commit_hash if current else None
        if current is not None:
            self.last_reload = f"swapped ({trigger}): {current.describe()} -> {result.describe()}"
            log.info("%s: now serving %s (was %s)", trigger, result.describe(), current.describe())
        else:
            log.info("%s: ready, serving %s", trigger, result.describe())
        if current is not None:
            old_alive = return_memory_when_freed(current.module, asyncio.get_running_loop())
            del current
            if old_alive():
                # a request still running on it, or a reference cycle: a full collection
                # holds the GIL for a while, so only then
                await asyncio.to_thread(gc.collect)
        return ReloadResult(from_commit, result.commit_hash, result.name, True)


def _forget_locals(error: BaseException) -> None:
    """Clear the local variables of the finished frames in ``error``'s tracebacks, and in
    those of the errors that caused it (a warm-up's error holds the model it ran)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__
