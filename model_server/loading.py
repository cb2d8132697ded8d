"""From the metadata to a module on the device: resolve, fetch (cached, verified), load, warm up.

Each step is timed and reported through a callback, so the app can log it, export it as
a metric and show it in ``/readyz``. A failing step raises ``LoadError`` naming the
step; the caller keeps the process alive (or the old model serving, on a reload).

One function per format, picked from the file's bytes (``nexus_cli.formats``), never
from its name. Nothing is unpickled outside ``torch.load(weights_only=True)``: a pickled
whole module is refused with the list of formats that load safely.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import stat
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nexus_cli.api import Project
from nexus_cli.cache import fetch_cached, find_cached
from nexus_cli.errors import IntegrityError, NexusError, NotFoundError, StorageError
from nexus_cli.files import describe_file_type
from nexus_cli.formats import detect_format
from nexus_cli.metadata import VersionRecord
from nexus_cli.serving import SignatureError, TensorSpec, sample_specs

from model_server.memory import return_free_memory
from model_server.settings import Settings

log = logging.getLogger("model_server.loading")

SAFE_FORMATS = (
    "TorchScript, a torch.export program (.pt2), a state_dict or safetensors "
    "(the last two with NEXUS_MODEL_FACTORY=module:callable)"
)
PUBLISH_HINT = "publish one with `nexus store` (for the compose stack: `make publish-demo`)"

#: torch dtype -> v2 datatype, for signatures derived from a torch.export program
_V2_DATATYPES = {
    torch.bool: "BOOL", torch.uint8: "UINT8", torch.int8: "INT8", torch.int16: "INT16",
    torch.int32: "INT32", torch.int64: "INT64", torch.float16: "FP16",
    torch.bfloat16: "BF16", torch.float32: "FP32", torch.float64: "FP64",
}  # fmt: skip

#: ``report(step, ok, detail, seconds)``: one call per finished (or failed) step
StepReporter = Callable[[str, bool, str, float], None]


class LoadError(Exception):
    """A start-up or reload step failed. ``step`` names it; ``cause`` sorts it:

    ``store`` (the object store failed or holds other bytes), ``device`` (out of memory),
    ``model`` (anything about the metadata, the file or the module).
    """

    def __init__(self, step: str, message: str, cause: str = "model") -> None:
        super().__init__(message)
        self.step = step
        self.message = message
        self.cause = cause


class ForwardError(Exception):
    """The module failed on a batch, or returned something that is not one tensor."""


@dataclass
class LoadedModel:
    """A module on its device with everything the routes need to know about it."""

    record: VersionRecord
    module: Any
    device: torch.device
    format: str
    signature: dict
    input_spec: TensorSpec
    output_spec: TensorSpec
    signature_known: bool
    #: a program that only takes batches of exactly this size (a static torch.export batch)
    fixed_batch: int | None = None
    info: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.record.model_name

    @property
    def commit_hash(self) -> str:
        return self.record.commit_hash

    def describe(self) -> str:
        return f"{self.name}@{self.record.short_commit} ({self.format} on {self.device})"

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Run one batch (a numpy array, batch first) and return the output as numpy.

        The caller holds the device lock. Under ``torch.inference_mode()``; a static
        batch size is honoured by running chunks (the last one padded).
        """
        if self.fixed_batch is None or len(batch) == self.fixed_batch:
            return self._forward(batch)
        size = self.fixed_batch
        parts = []
        for start in range(0, len(batch), size):
            chunk = batch[start : start + size]
            rows = len(chunk)
            if rows < size:
                padding = np.zeros((size - rows, *chunk.shape[1:]), chunk.dtype)
                chunk = np.concatenate([chunk, padding])
            parts.append(self._forward(chunk)[:rows])
        return np.concatenate(parts)

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(batch).to(self.device, non_blocking=True)
        try:
            with torch.inference_mode():
                output = self.module(tensor)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:
            raise ForwardError(_first_line(exc)) from exc
        if isinstance(output, list | tuple) and len(output) == 1:
            output = output[0]
        elif isinstance(output, dict) and len(output) == 1:
            output = next(iter(output.values()))
        if not isinstance(output, torch.Tensor):
            raise ForwardError(
                f"the model returned {type(output).__name__}; serving takes one output tensor"
            )
        if output.dim() == 0 or output.shape[0] != len(batch):
            raise ForwardError(
                f"the model returned shape {list(output.shape)} for a batch of {len(batch)}; "
                "the first dimension must be the batch"
            )
        if output.dtype == torch.bfloat16:
            output = output.float()
        return output.detach().cpu().numpy()


#: what a factory's module or call may raise, sys.exit() and argparse included: a failed load,
#: never the end of the process (a SystemExit in the loading thread would stop the server)
_FATAL_IN_USER_CODE = (Exception, SystemExit, KeyboardInterrupt)


def _failure(exc: BaseException) -> str:
    """How user code failed, in words (``it exited with status 2`` for a ``sys.exit(2)``)."""
    if isinstance(exc, SystemExit):
        return f"it exited with status {exc.code!r} (sys.exit, or argparse run on import?)"
    return f"{type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


@contextlib.contextmanager
def _timed(step: str, report: StepReporter) -> Iterator[dict]:
    """Time a step; the body may put a ``detail`` in the yielded dict for the report."""
    note: dict = {"detail": "ok"}
    started = time.perf_counter()
    try:
        yield note
    except LoadError as exc:
        report(step, False, exc.message, time.perf_counter() - started)
        raise
    except _FATAL_IN_USER_CODE as exc:  # a failure nobody foresaw still fails only this step
        log.exception("%s: unexpected failure", step)
        message = f"unexpected {type(exc).__name__}: {_first_line(exc)}"
        report(step, False, message, time.perf_counter() - started)
        raise LoadError(step, message) from exc
    report(step, True, note["detail"], time.perf_counter() - started)


# resolve -----------------------------------------------------------------------------


def open_project(settings: Settings) -> Project:
    return Project(settings.meta_path, settings.config_path, environ=dict(settings.environ))


def resolve_latest(settings: Settings, project: Project) -> VersionRecord:
    """The latest version of ``NEXUS_MODEL`` (or of the only model) in the metadata."""
    try:
        mode = settings.meta_path.stat().st_mode  # through a link: what a reader would open
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise LoadError("metadata", f"cannot read {settings.meta_path}: {exc.strerror}") from exc
    if mode is not None and not stat.S_ISREG(mode):
        raise LoadError(
            "metadata",
            f"{settings.meta_path} is {describe_file_type(mode)}, not a regular file: "
            "point NEXUS_META at the metadata file",
        )
    if mode is None:
        raise LoadError(
            "metadata",
            f"no metadata at {settings.meta_path}: run the server where .nexus_meta.json is, "
            f"or set NEXUS_META; to start a registry, {PUBLISH_HINT}",
        )
    try:
        metadata = project.metadata()
        models = sorted(name for name, versions in metadata.models.items() if versions)
        if not models:
            raise LoadError(
                "metadata", f"{settings.meta_path} has no model yet: {PUBLISH_HINT}, then reload"
            )
        name = settings.model
        if name is None:
            if len(models) > 1:
                raise LoadError(
                    "metadata",
                    f"{settings.meta_path} has {len(models)} models ({', '.join(models)}): "
                    "set NEXUS_MODEL to the one to serve",
                )
            name = models[0]
        return metadata.latest(name)
    except NexusError as exc:
        raise LoadError("metadata", str(exc)) from exc


# fetch --------------------------------------------------------------------------------


def fetch_weights(settings: Settings, project: Project, record: VersionRecord) -> tuple[Path, bool]:
    """The verified local file for ``record`` and whether it came from the cache."""
    try:
        cached = find_cached(record, settings.cache_dir)
        if cached is not None:
            return cached, True
        return fetch_cached(project, record, settings.cache_dir), False
    except (StorageError, IntegrityError, NotFoundError) as exc:
        raise LoadError("weights", str(exc), cause="store") from exc
    except (ConnectionError, TimeoutError) as exc:  # a network error no backend translated
        raise LoadError(
            "weights", f"the store could not be reached: {_first_line(exc)}", cause="store"
        ) from exc
    except NexusError as exc:
        raise LoadError("weights", str(exc)) from exc
    except OSError as exc:
        raise LoadError("weights", f"cache folder {settings.cache_dir}: {exc}") from exc


# load ----------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LoadError("load", f"NEXUS_DEVICE={name}, but CUDA is not available here")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise LoadError(
                "load",
                f"NEXUS_DEVICE={name}, but only {torch.cuda.device_count()} CUDA device(s) exist",
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise LoadError("load", f"NEXUS_DEVICE={name}, but MPS is not available here")
    return device


def import_factory(spec: str | None, fmt: str) -> Callable[[], Any]:
    """``NEXUS_MODEL_FACTORY``'s callable; the working directory is importable (like uvicorn)."""
    if spec is None:
        raise LoadError(
            "load",
            f"{fmt} weights hold no code: set NEXUS_MODEL_FACTORY=module:callable to a "
            "function that builds the module (e.g. model_server.demo:build_model)",
        )
    module_name, _, attribute = spec.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        target: Any = importlib.import_module(module_name)
    except _FATAL_IN_USER_CODE as exc:
        raise LoadError(
            "load", f"NEXUS_MODEL_FACTORY={spec}: cannot import {module_name}: {_failure(exc)}"
        ) from exc
    try:
        for part in attribute.split("."):
            target = getattr(target, part)
    except AttributeError:
        raise LoadError(
            "load", f"NEXUS_MODEL_FACTORY={spec}: {module_name} has no {attribute}"
        ) from None
    if not callable(target):
        raise LoadError("load", f"NEXUS_MODEL_FACTORY={spec} is not callable")
    return target


def _has_meta_tensors(module: torch.nn.Module) -> bool:
    return any(t.is_meta for t in chain(module.parameters(), module.buffers()))


def build_with_weights(
    factory_spec: str | None, fmt: str, weights: dict, device: torch.device
) -> torch.nn.Module:
    """Build the factory's module and give it ``weights`` (names and shapes must match).

    The module is first built on the ``meta`` device and the weights assigned in place:
    no random initialisation, no second copy of the weights. A factory that cannot be
    built that way (it computes with data, or keeps buffers outside the state dict) is
    built normally and loaded by copy.
    """
    factory = import_factory(factory_spec, fmt)
    if not isinstance(weights, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()
    ):
        raise LoadError("load", f"the {fmt} file is not a flat mapping of names to tensors")
    module: Any = None
    try:
        with torch.device("meta"):
            module = factory()
    except _FATAL_IN_USER_CODE:  # any failure here means: build it for real below
        module = None
    if isinstance(module, torch.nn.Module):
        try:
            module.load_state_dict(weights, strict=True, assign=True)
        except Exception:  # noqa: BLE001 - the real build below says what does not fit
            module = None
        else:
            if _has_meta_tensors(module):
                module = None
    if not isinstance(module, torch.nn.Module):
        try:
            module = factory()
        except _FATAL_IN_USER_CODE as exc:
            raise LoadError(
                "load", f"NEXUS_MODEL_FACTORY={factory_spec} failed: {_failure(exc)}"
            ) from exc
        if not isinstance(module, torch.nn.Module):
            raise LoadError(
                "load",
                f"NEXUS_MODEL_FACTORY={factory_spec} returned {type(module).__name__}, "
                "not a torch.nn.Module",
            )
        try:
            module.load_state_dict(weights, strict=True)
        except Exception as exc:
            raise LoadError(
                "load",
                f"the weights do not fit NEXUS_MODEL_FACTORY={factory_spec}: {_first_line(exc)}",
            ) from exc
    return module.to(device).eval()


def load_torchscript(path: Path, device: torch.device, factory: str | None) -> tuple[Any, None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices
        return torch.jit.load(str(path), map_location=device).eval(), None


def load_torch_export(path: Path, device: torch.device, factory: str | None) -> tuple[Any, dict]:
    program = torch.export.load(str(path))
    # an exported program is already in inference form (it has no train/eval switch)
    return program.module().to(device), signature_of_program(program)


def load_state_dict(path: Path, device: torch.device, factory: str | None) -> tuple[Any, None]:
    # read into process memory, not mmapped: forward passes over weights left in a mapping
    # of the downloaded cache file ran ~4% slower here (two servers side by side on one
    # cache file, the 286 MB benchmark MLP); a warm start pays ~0.15 s for the copy
    weights = torch.load(path, map_location=device, weights_only=True)
    return build_with_weights(factory, "state_dict", weights, device), None


def load_safetensors(path: Path, device: torch.device, factory: str | None) -> tuple[Any, None]:
    from safetensors.torch import load_file

    weights = load_file(str(path), device=str(device))
    return build_with_weights(factory, "safetensors", weights, device), None


LOADERS = {
    "torchscript": load_torchscript,
    "torch_export": load_torch_export,
    "state_dict": load_state_dict,
    "safetensors": load_safetensors,
}


def _tensor_entry(name: str, value: Any) -> dict:
    shape = [d if isinstance(d, int) else -1 for d in getattr(value, "shape", [])]
    datatype = _V2_DATATYPES.get(getattr(value, "dtype", None), "FP32")
    return {"name": name, "datatype": datatype, "shape": shape or [-1]}


def signature_of_program(program: Any) -> dict | None:
    """A signature from a torch.export program's placeholders and outputs (-1: dynamic)."""
    try:
        user_inputs = set(program.graph_signature.user_inputs)
        nodes = list(program.graph.nodes)
        inputs = [
            _tensor_entry(n.name, n.meta.get("val"))
            for n in nodes
            if n.op == "placeholder" and n.name in user_inputs
        ]
        output_node = next(n for n in nodes if n.op == "output")
        results = output_node.args[0]
        results = results if isinstance(results, list | tuple) else [results]
        outputs = [
            _tensor_entry(f"output{i}" if len(results) > 1 else "output", r.meta.get("val"))
            for i, r in enumerate(results)
        ]
    except (AttributeError, StopIteration, KeyError, IndexError):
        return None
    return {"inputs": inputs, "outputs": outputs}


def unknown_signature() -> dict:
    return {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1]}],
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1]}],
    }


def load_module(
    path: Path, record: VersionRecord, device: torch.device, factory: str | None
) -> LoadedModel:
    fmt = detect_format(path)
    loader = LOADERS.get(fmt)
    if loader is None:
        raise LoadError(
            "load",
            f"{record.storage_uri} is not a format the server loads safely (detected: {fmt}; "
            f"a pickled whole module is never loaded): store it as {SAFE_FORMATS}",
        )
    try:
        module, derived = loader(path, device, factory)
    except LoadError:
        raise
    except torch.OutOfMemoryError as exc:
        raise LoadError("load", f"out of memory on {device}: {_first_line(exc)}", "device") from exc
    except Exception as exc:
        raise LoadError("load", f"cannot load {fmt} from {path.name}: {_first_line(exc)}") from exc
    signature = record.signature or derived
    try:
        input_spec, output_spec = sample_specs(signature)
    except (SignatureError, KeyError, TypeError) as exc:
        raise LoadError("load", f"signature: {exc}") from exc
    published = signature or unknown_signature()
    fixed_batch = None
    if derived and record.signature is None:
        first = derived["inputs"][0]["shape"][0] if derived["inputs"] else -1
        fixed_batch = first if first > 0 else None
    return LoadedModel(
        record=record,
        module=module,
        device=device,
        format=fmt,
        signature={k: [dict(t) for t in v] for k, v in published.items()},
        input_spec=input_spec,
        output_spec=output_spec,
        signature_known=signature is not None,
        fixed_batch=fixed_batch,
    )


def warm_up(model: LoadedModel, device_lock: threading.Lock) -> str:
    """One forward pass on zeros when the input shape is known; fills an unknown output shape."""
    shape = model.input_spec.shape
    if shape is None or -1 in shape:
        return "skipped: the input shape is not fully known"
    batch = np.zeros((1, *shape), dtype=model.input_spec.dtype)
    try:
        with device_lock:
            output = model.forward(batch)
    except torch.OutOfMemoryError as exc:
        raise LoadError(
            "warmup", f"out of memory on {model.device}: {_first_line(exc)}", "device"
        ) from exc
    except ForwardError as exc:
        raise LoadError("warmup", f"a forward pass on zeros failed: {exc}") from exc
    outputs = model.signature["outputs"]
    if outputs and outputs[0]["shape"] == [-1]:
        outputs[0]["shape"] = [-1, *output.shape[1:]]
    return f"output shape {[-1, *output.shape[1:]]}"


def load_latest(
    settings: Settings,
    report: StepReporter,
    device_lock: threading.Lock,
    *,
    current: VersionRecord | None = None,
) -> LoadedModel | VersionRecord:
    """Run every step for the latest version; returns ``current`` unchanged when it is still
    the latest (nothing fetched or loaded), else the new ``LoadedModel``."""
    project = open_project(settings)
    with _timed("metadata", report) as note:
        record = resolve_latest(settings, project)
        note["detail"] = f"{record.model_name}@{record.short_commit} ({record.format})"
    if current is not None and (record.model_name, record.commit_hash, record.sha256) == (
        current.model_name,
        current.commit_hash,
        current.sha256,
    ):
        return current
    with _timed("weights", report) as note:
        path, hit = fetch_weights(settings, project, record)
        note["detail"] = f"{'cache hit' if hit else 'downloaded'}: {path}"
    if not hit:
        return_free_memory()  # the download's part buffers, before the weights arrive
    with _timed("load", report) as note:
        device = resolve_device(settings.device)
        model = load_module(path, record, device, settings.factory)
        note["detail"] = model.describe()
    with _timed("warmup", report) as note:
        note["detail"] = warm_up(model, device_lock)
    return model
