"""JSON body <-> numpy batches: the hot path of every request, with no loop over numbers.

Decoding tries the whole batch as one array first (orjson parses, numpy converts in C);
only when that fails (ragged samples, a wrong value somewhere) does it look at the
samples one by one, to group them by shape or to say which one is wrong and why.
Encoding hands numpy arrays straight to orjson, which writes them in C.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from nexus_cli.serving import (
    BadRequest,
    InvalidInput,
    PayloadTooLarge,
    TensorSpec,
    check_sample,
    format_shape,
    shape_matches,
)

_LITERALS = (b"true", b"false", b"null")
#: commas allowed outside the samples (other keys a client sends along)
_SPARE_COMMAS = 4096
#: bodies up to this size are parsed without counting their numbers first: at most half
#: a million numbers, ~16 MB of Python objects, costs less than the count itself
_UNCOUNTED_BYTES = 1024 * 1024
_MAX_DEPTH = 32


@dataclass(frozen=True)
class Group:
    """Samples that share a shape, stacked: ``indices[i]`` is the position of row ``i``
    in the request (``None``: the whole request, in order)."""

    array: np.ndarray
    indices: list[int] | None = None


@dataclass(frozen=True)
class Batch:
    count: int
    groups: list[Group]


def parse_body(body: bytes) -> list[Any]:
    """The ``inputs`` list of a ``{"inputs": [...]}`` body."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(document, dict) or "inputs" not in document:
        raise BadRequest('the body must be a JSON object {"inputs": [sample, ...]}')
    inputs = document["inputs"]
    if not isinstance(inputs, list):
        raise BadRequest('"inputs" must be a list of samples')
    return inputs


def decode_batch(body: bytes, spec: TensorSpec, max_batch: int) -> Batch:
    """Parse, check and group the samples of a ``/predict/batch`` body.

    ``InvalidInput`` (422) names the first bad sample and what is wrong with it.
    """
    _refuse_more_numbers_than_fit(body, spec, max_batch)
    inputs = parse_body(body)
    count = len(inputs)
    if count == 0:
        raise InvalidInput("inputs: empty batch; send at least one sample", code="empty_batch")
    if count > max_batch:
        raise PayloadTooLarge(
            f"inputs: {count} samples; this server takes at most {max_batch} per request "
            "(NEXUS_SERVER_MAX_BATCH)",
            code="batch_too_large",
        )
    if spec.dtype.kind != "b" and _may_hold_literals(body):
        _refuse_literals(inputs, spec)
    # only the "inputs" key is quoted: no strings, which numpy would parse as numbers
    only_numbers = _quotes_at_most(body, 2)
    whole = _whole_batch(inputs, spec, only_numbers)
    if whole is not None:
        return Batch(count, [Group(whole)])
    return Batch(count, _grouped(inputs, spec))


def _refuse_more_numbers_than_fit(body: bytes, spec: TensorSpec, max_batch: int) -> None:
    """413 before parsing a body that holds more numbers than ``max_batch`` samples can.

    Parsing builds a Python object per number: ``[0,0,0,...]`` costs ~15 times its size
    in memory and holds the GIL for a second per 60 MiB. When the sample shape is fully
    known, the commas of a large body are counted first (about 1 GB/s): ``max_batch``
    samples of P numbers hold fewer than ``max_batch * (2 * P + 1)`` commas, however they
    are nested. A body under ``_UNCOUNTED_BYTES`` is harmless to parse whatever it holds.
    """
    if spec.shape is None or any(d < 0 for d in spec.shape):
        return
    per_sample = math.prod(spec.shape)
    most = max_batch * (2 * per_sample + 1) + _SPARE_COMMAS
    if len(body) > max(most, _UNCOUNTED_BYTES) and body.count(b",") > most:
        raise PayloadTooLarge(
            f"inputs: the body holds more numbers than {max_batch} samples of shape "
            f"{format_shape(spec.shape)} can (NEXUS_SERVER_MAX_BATCH)",
            code="batch_too_large",
        )


def _quotes_at_most(body: bytes, count: int) -> bool:
    """Whether ``body`` holds at most ``count`` double quotes (a few memchr scans, where
    ``bytes.count`` would compare every byte)."""
    position = -1
    for _ in range(count + 1):
        position = body.find(b'"', position + 1)
        if position < 0:
            return True
    return False


def _may_hold_literals(body: bytes) -> bool:
    """Whether ``true``, ``false`` or ``null`` may be in ``body``: a body of numbers under
    ``"inputs"`` holds no ``l`` and no ``r``, and a one-byte search runs at memchr speed;
    only when one is there are the literals looked for."""
    if b"l" not in body and b"r" not in body:
        return False
    return any(literal in body for literal in _LITERALS)


def _whole_batch(inputs: list[Any], spec: TensorSpec, only_numbers: bool) -> np.ndarray | None:
    """The batch as one checked array when every sample has the same valid shape, else None."""
    if spec.dtype.kind == "f" and only_numbers:
        return _whole_float_batch(inputs, spec)
    try:
        raw = np.asarray(inputs)
    except (ValueError, TypeError, RecursionError):
        return None  # ragged: samples of several shapes, or junk
    if raw.dtype.kind not in "iufb" or raw.ndim < 1:
        return None
    if spec.shape is not None and (
        raw.ndim != 1 + len(spec.shape) or not shape_matches(raw.shape[1:], spec.shape)
    ):
        return None
    batch_spec = TensorSpec(spec.name, spec.datatype, None)
    try:
        return np.ascontiguousarray(check_sample(raw, batch_spec, "inputs"))
    except InvalidInput:
        return None  # a bad value somewhere: find it sample by sample


def _whole_float_batch(inputs: list[Any], spec: TensorSpec) -> np.ndarray | None:
    """The fast path for float signatures: one conversion straight to the target dtype.

    Only for bodies without strings and literals (numpy would read ``"1.5"`` as 1.5,
    ``true`` as 1 and ``null`` as NaN).

    Anything unusual (ragged samples, strings, a value the dtype cannot hold, a shape that
    does not match) returns None, and the sample-by-sample path says which and why.
    """
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            batch = np.array(inputs, dtype=spec.dtype)
    except (ValueError, TypeError, OverflowError, RecursionError):
        return None
    if batch.ndim < 1 or batch.size == 0 or not np.isfinite(batch).all():
        return None
    if spec.shape is not None and (
        batch.ndim != 1 + len(spec.shape) or not shape_matches(batch.shape[1:], spec.shape)
    ):
        return None
    return batch


def _grouped(inputs: list[Any], spec: TensorSpec) -> list[Group]:
    by_shape: dict[tuple[int, ...], list[int]] = {}
    arrays: list[np.ndarray] = []
    for index, sample in enumerate(inputs):
        array = check_sample(sample, spec, f"inputs[{index}]")
        arrays.append(array)
        by_shape.setdefault(array.shape, []).append(index)
    return [Group(np.stack([arrays[i] for i in indices]), indices) for indices in by_shape.values()]


def _refuse_literals(inputs: list[Any], spec: TensorSpec) -> None:
    """Refuse a sample holding ``true``, ``false`` or ``null`` (the raw body mentions one).

    numpy would turn ``[1, true]`` into ``[1, 1]`` without a word, so booleans among
    numbers must be caught before conversion. Only runs when the bytes hold a literal.
    """
    for index, sample in enumerate(inputs):
        found = _find_literal(sample, 0)
        if found is not None:
            raise InvalidInput(f"inputs[{index}]: expected numbers ({spec.datatype}), got {found}")


def _find_literal(value: Any, depth: int) -> str | None:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, list):
        if depth >= _MAX_DEPTH:
            return f"lists nested deeper than {_MAX_DEPTH} levels"
        for item in value:
            found = _find_literal(item, depth + 1)
            if found is not None:
                return found
    return None


def check_outputs(batch: Batch, outputs: list[np.ndarray]) -> None:
    """A non-finite output is an error for this request (422 ``non_finite_output``)."""
    for group, output in zip(batch.groups, outputs, strict=True):
        if output.dtype.kind != "f" or np.isfinite(output).all():
            continue
        bad = output.reshape(len(output), -1)
        row = int(np.flatnonzero(~np.isfinite(bad).all(axis=1))[0])
        index = group.indices[row] if group.indices is not None else row
        raise InvalidInput(
            f"outputs[{index}]: the model produced a non-finite number (NaN or infinity) "
            f"for inputs[{index}]",
            code="non_finite_output",
        )


def encode_outputs(batch: Batch, outputs: list[np.ndarray], model: dict[str, str]) -> bytes:
    """``{"outputs": [...], "model": {...}}`` with the outputs in request order."""
    if len(batch.groups) == 1 and batch.groups[0].indices is None:
        ordered: Any = np.ascontiguousarray(outputs[0])
    else:
        ordered = [None] * batch.count
        for group, output in zip(batch.groups, outputs, strict=True):
            rows = np.ascontiguousarray(output)
            for row, index in enumerate(group.indices or range(len(rows))):
                ordered[index] = rows[row]
    document = {"outputs": ordered, "model": model}
    try:
        return orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    except orjson.JSONEncodeError:  # a dtype orjson does not write natively
        return orjson.dumps(document, default=lambda value: value.tolist())
