"""What the model server and the proxy share: the error shape, and checking one sample.

Importable without torch, FastAPI or the rest of the control plane (it needs numpy
only), so that the proxy can check a request against the model's signature before it
joins a batch, and both services answer every error in one shape::

    {"error": {"message": "inputs[3]: expected shape [8], got [7]",
               "type": "invalid_request_error", "code": "invalid_input"}}

Each error class carries its HTTP status, so a route raises and a single exception
handler renders; framework errors (404, 405, 422 from validation) are mapped through
``error_for_status``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

# errors ---------------------------------------------------------------------------------


class ServingError(Exception):
    """An error a service answers with: its status, OpenAI-style type and code, a message."""

    status = 500
    type = "server_error"
    code = "internal_error"

    def __init__(
        self, message: str, *, code: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, dict[str, str]]:
        return error_body(self.message, self.type, self.code)

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after)))}


class BadRequest(ServingError):
    """The request itself is malformed: not JSON, wrong content type, a missing field."""

    status, type, code = 400, "invalid_request_error", "invalid_request"


class InvalidInput(ServingError):
    """A well-formed request whose values the model cannot take (shape, dtype, non-finite)."""

    status, type, code = 422, "invalid_request_error", "invalid_input"


class Unauthorized(ServingError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class NotFound(ServingError):
    status, type, code = 404, "not_found_error", "not_found"


class MethodNotAllowed(ServingError):
    status, type, code = 405, "invalid_request_error", "method_not_allowed"


class PayloadTooLarge(ServingError):
    status, type, code = 413, "invalid_request_error", "body_too_large"


class QueueFull(ServingError):
    """Too much is waiting already; come back after ``Retry-After`` seconds."""

    status, type, code = 429, "rate_limit_error", "queue_full"


class Unavailable(ServingError):
    """Not ready, shutting down, or overloaded (with ``Retry-After``)."""

    status, type, code = 503, "service_unavailable", "unavailable"


class UpstreamError(ServingError):
    """The next hop failed or answered something unusable."""

    status, type, code = 502, "upstream_error", "bad_gateway"


class GatewayTimeout(ServingError):
    status, type, code = 504, "timeout_error", "timeout"


def error_body(message: str, type_: str, code: str) -> dict[str, dict[str, str]]:
    return {"error": {"message": message, "type": type_, "code": code}}


_BY_STATUS: dict[int, type[ServingError]] = {
    cls.status: cls
    for cls in (
        BadRequest, InvalidInput, Unauthorized, NotFound, MethodNotAllowed, PayloadTooLarge,
        QueueFull, Unavailable, UpstreamError, GatewayTimeout,
    )
}  # fmt: skip


def error_for_status(status: int, message: str) -> ServingError:
    """The error of our shape for a bare HTTP status (a framework's 404, 405, ...)."""
    cls = _BY_STATUS.get(status)
    if cls is not None:
        return cls(message)
    error = ServingError(message)
    error.status = status
    if 400 <= status < 500:
        error.type, error.code = "invalid_request_error", "invalid_request"
    return error


# settings -------------------------------------------------------------------------------

Number = TypeVar("Number", int, float)


class SettingsError(ValueError):
    """A setting a service cannot run with; the message names the variable."""


def env_number(
    env: Mapping[str, str],
    name: str,
    default: Number,
    parse: Callable[[str], Number],
    *,
    low: float,
    high: float,
) -> Number:
    """``env[name]`` read with ``parse`` (``int`` or ``float``) and checked to lie in [low, high].

    ``default`` when the variable is unset or blank; NaN is refused like any value out of range.
    """
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = parse(raw.strip())
    except ValueError:
        what = "a whole number" if parse is int else "a number"
        raise SettingsError(f"{name}={raw!r}: expected {what}") from None
    if not low <= value <= high:  # False for NaN too
        raise SettingsError(f"{name}={raw!r}: expected a value from {low:g} to {high:g}")
    return value


# samples --------------------------------------------------------------------------------

#: v2 datatype -> numpy dtype, for the datatypes a tensor of numbers can have
NUMPY_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(dtype)
    for name, dtype in {
        "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
        "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
        "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
    }.items()
}  # fmt: skip


class SignatureError(ValueError):
    """A signature that the services cannot serve (several inputs, a non-numeric type)."""


@dataclass(frozen=True)
class TensorSpec:
    """One sample's tensor: its name, v2 datatype, and shape without the batch dimension.

    ``-1`` in ``shape`` is a free dimension; ``shape=None`` means any shape (no signature).
    """

    name: str
    datatype: str = "FP32"
    shape: tuple[int, ...] | None = None

    @property
    def dtype(self) -> np.dtype:
        return NUMPY_DTYPES[self.datatype]

    def batch_shape(self) -> list[int]:
        """The v2 shape of a batch of these samples: ``[-1, *shape]`` (``[-1]`` if unknown)."""
        return [-1, *(self.shape or ())]


#: what is served when the metadata gives no signature
DEFAULT_INPUT = TensorSpec("input")
DEFAULT_OUTPUT = TensorSpec("output")


def _tensor_spec(tensor: Mapping[str, Any]) -> TensorSpec:
    datatype, shape = tensor["datatype"], list(tensor["shape"])
    if datatype not in NUMPY_DTYPES:
        raise SignatureError(f"tensor {tensor['name']!r} is {datatype}; only numeric tensors serve")
    return TensorSpec(tensor["name"], datatype, tuple(shape[1:]))


def sample_specs(signature: Mapping[str, Any] | None) -> tuple[TensorSpec, TensorSpec]:
    """The one input and one output of a signature (section 3's shape), batch dim dropped.

    With no signature: FP32 in and out, any shape. ``SignatureError`` when the signature
    has several inputs or outputs, or a type that is not a number.
    """
    if signature is None:
        return DEFAULT_INPUT, DEFAULT_OUTPUT
    inputs, outputs = signature["inputs"], signature["outputs"]
    if len(inputs) != 1 or len(outputs) > 1:
        raise SignatureError(
            f"the signature has {len(inputs)} inputs and {len(outputs)} outputs; "
            "serving takes one input and one output tensor per sample"
        )
    output = _tensor_spec(outputs[0]) if outputs else DEFAULT_OUTPUT
    return _tensor_spec(inputs[0]), output


def format_shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def shape_matches(shape: Sequence[int], expected: Sequence[int] | None) -> bool:
    if expected is None:
        return True
    if len(shape) != len(expected):
        return False
    return all(e in (-1, s) for s, e in zip(shape, expected, strict=True))


def check_sample(value: Any, spec: TensorSpec, where: str = "input") -> np.ndarray:
    """``value`` (numbers nested in lists, as JSON gives them) as an array of ``spec``'s dtype.

    Raises ``InvalidInput`` naming ``where`` and what is wrong: not rectangular, not
    numbers (strings, nulls, objects; booleans for a numeric type), a shape that does not
    match, a non-finite number, a value outside the datatype's range. numpy does the
    conversion in C; there is no Python loop over the numbers. (A boolean mixed among
    numbers is converted by numpy before it can be seen; callers that hold the raw JSON
    can refuse ``true``/``false`` literals there.)
    """
    try:
        raw = np.asarray(value)
    except (ValueError, TypeError, RecursionError):
        raise InvalidInput(f"{where}: not a rectangular array of numbers (ragged lists?)") from None
    kind = raw.dtype.kind
    wanted = spec.dtype
    if wanted.kind == "b":
        if kind != "b":
            raise InvalidInput(f"{where}: expected booleans ({spec.datatype})")
    elif kind not in "iuf":
        what = {"b": "booleans", "U": "strings", "S": "strings"}.get(kind, "non-numbers")
        raise InvalidInput(f"{where}: expected numbers ({spec.datatype}), got {what}")
    if not shape_matches(raw.shape, spec.shape):
        raise InvalidInput(
            f"{where}: expected shape {format_shape(spec.shape or ())}, "
            f"got {format_shape(raw.shape)}"
        )
    if raw.size == 0:
        raise InvalidInput(f"{where}: empty tensor (shape {format_shape(raw.shape)})")
    if wanted.kind == "b":
        return raw
    if wanted.kind in "iu":
        if kind == "f":
            raise InvalidInput(f"{where}: expected integers ({spec.datatype}), got decimals")
        info = np.iinfo(wanted)
        if raw.min() < info.min or raw.max() > info.max:
            raise InvalidInput(
                f"{where}: a value is outside {spec.datatype}'s range [{info.min}, {info.max}]"
            )
        return raw.astype(wanted, copy=False)
    if kind == "f" and not np.isfinite(raw).all():
        raise InvalidInput(f"{where}: non-finite number (NaN or infinity)")
    with np.errstate(over="ignore"):
        converted = raw.astype(wanted, copy=False)
    if not np.isfinite(converted).all():
        limit = float(np.finfo(wanted).max)
        raise InvalidInput(f"{where}: a value is outside {spec.datatype}'s range (±{limit:.4g})")
    return converted
