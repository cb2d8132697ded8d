"""Open Inference Protocol (KServe v2) REST codec: JSON and the binary tensor extension.

A v2 inference request names its input tensors with a shape whose first dimension is
the batch, and carries the data either as JSON (``"data"``, flat row-major or nested)
or, with the binary tensor data extension, as raw little-endian bytes after the JSON
header: the header's length is in ``Inference-Header-Content-Length`` and each binary
input says its size in ``parameters.binary_data_size``. Outputs come back binary when
the request asks for it (``parameters.binary_data_output``, or ``binary_data`` on a
requested output), which is what tritonclient's HTTP client does by default.

This module only translates: bytes and headers in, checked numpy rows out; outputs in,
bytes and headers out. It knows nothing of batching or of the model servers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from nexus_cli.serving import (
    NUMPY_DTYPES,
    BadRequest,
    InvalidInput,
    TensorSpec,
    UpstreamError,
    check_sample,
    format_shape,
)

HEADER_LENGTH = "inference-header-content-length"
EXTENSIONS = ["binary_tensor_data"]
#: most dimensions of one sample (numpy's own limit is 64, batch dimension included)
MAX_SAMPLE_DIMS = 32

_PLATFORMS = {"torchscript": "pytorch_libtorch", "torch_export": "pytorch_libtorch"}


@dataclass(frozen=True)
class InferRequest:
    """A decoded v2 request: its rows (batch first), already checked against the input."""

    id: str | None
    rows: np.ndarray
    timeout_s: float | None
    output_name: str
    binary_output: bool


def parse_infer(
    body: bytes, header_length: str | None, spec: TensorSpec, output: TensorSpec
) -> InferRequest:
    """Decode a v2 ``infer`` body (JSON, or JSON header + binary tensors)."""
    header, binary = _split(body, header_length)
    try:
        document = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the inference request is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise BadRequest("the inference request must be a JSON object")
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequest(
            f"expected exactly one input tensor {spec.name!r}; the model takes one input"
        )
    rows = _input_rows(inputs[0], binary, spec, b"true" in header or b"false" in header)
    parameters = _parameters(document, "request")
    binary_output = _flag(parameters, "binary_data_output", "request")
    requested = document.get("outputs")
    if requested is not None:
        if not isinstance(requested, list) or not all(isinstance(o, dict) for o in requested):
            raise BadRequest("'outputs' must be a list of objects with a 'name'")
        for wanted in requested:
            if wanted.get("name") != output.name:
                raise BadRequest(
                    f"unknown output {wanted.get('name')!r}; the model's output is {output.name!r}"
                )
            out_params = _parameters(wanted, f"output {output.name!r}")
            if "binary_data" in out_params:
                binary_output = _flag(out_params, "binary_data", f"output {output.name!r}")
    request_id = document.get("id")
    return InferRequest(
        id=str(request_id) if request_id is not None else None,
        rows=rows,
        timeout_s=_timeout(parameters),
        output_name=output.name,
        binary_output=binary_output,
    )


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    try:
        length = int(header_length)
    except ValueError:
        raise BadRequest("Inference-Header-Content-Length must be a whole number") from None
    if not 0 < length <= len(body):
        raise BadRequest(
            f"Inference-Header-Content-Length is {length} but the body has {len(body)} bytes"
        )
    return body[:length], body[length:]


def _parameters(document: dict, where: str) -> dict[str, Any]:
    parameters = document.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest(f"'parameters' of the {where} must be an object")
    return parameters


def _flag(parameters: dict[str, Any], name: str, where: str) -> bool:
    """A boolean parameter; JSON ``true``/``false`` only (``bool("false")`` is True)."""
    value = parameters.get(name, False)
    if not isinstance(value, bool):
        raise BadRequest(f"parameters.{name} of the {where} must be true or false, not {value!r}")
    return value


def _timeout(parameters: dict[str, Any]) -> float | None:
    """``parameters.timeout`` in microseconds, as Triton reads it; None when absent."""
    value = parameters.get("timeout")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise BadRequest("parameters.timeout must be a positive number of microseconds")
    return value / 1e6


def _input_rows(
    tensor: dict[str, Any], binary: bytes, spec: TensorSpec, literals: bool
) -> np.ndarray:
    """The input's rows; ``literals``: the JSON has ``true``/``false`` somewhere."""
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if name != spec.name:
        raise BadRequest(f"unknown input {name!r}; the model's input is {spec.name!r}")
    if datatype not in NUMPY_DTYPES:
        raise BadRequest(
            f"input {name!r}: datatype {datatype!r} is not served; use {spec.datatype}"
        )
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise BadRequest(f"input {name!r}: shape must be a list of sizes, batch first")
    if len(shape) > MAX_SAMPLE_DIMS + 1:
        raise BadRequest(
            f"input {name!r}: {len(shape)} dimensions; at most {MAX_SAMPLE_DIMS + 1} are served"
        )
    if shape[0] < 1:
        raise InvalidInput(f"input {name!r}: the batch dimension is 0")
    count = math.prod(shape)
    parameters = _parameters(tensor, f"input {name!r}")
    dtype = NUMPY_DTYPES[datatype].newbyteorder("<")
    if "binary_data_size" in parameters:
        size = parameters["binary_data_size"]
        if not isinstance(size, int) or size != count * dtype.itemsize or size > len(binary):
            raise BadRequest(
                f"input {name!r}: binary_data_size {size!r} does not match shape "
                f"{format_shape(shape)} of {datatype} ({count * dtype.itemsize} bytes) "
                f"or the {len(binary)} bytes after the header"
            )
        flat = np.frombuffer(binary, dtype=dtype, count=count)
    elif "data" in tensor:
        if datatype != "BOOL" and literals and has_bool(tensor["data"]):
            raise InvalidInput(f"input {name!r}: expected numbers ({datatype}), got booleans")
        flat = check_sample(tensor["data"], TensorSpec(name, datatype), f"input {name!r}")
        flat = flat.reshape(-1)
        if flat.size != count:
            raise InvalidInput(
                f"input {name!r}: {flat.size} values for shape {format_shape(shape)} "
                f"({count} values)"
            )
    else:
        raise BadRequest(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
    rows = flat.reshape(shape)
    batch_spec = TensorSpec(spec.name, spec.datatype, (-1, *spec.shape) if spec.shape else None)
    return check_sample(rows, batch_spec, f"input {name!r}")


def has_bool(data: Any) -> bool:
    """Whether JSON numbers nested in lists hold a boolean (numpy would take it as 0/1).

    A loop, not recursion: the nesting is the caller's, as deep as the JSON parser allows.
    """
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, bool):
            return True
        if isinstance(item, list) and item:
            if isinstance(item[0], list):
                stack.extend(item)
            elif any(isinstance(value, bool) for value in item):
                return True
    return False


def encode_rows(rows: np.ndarray) -> bytes:
    """The rows as the inside of a JSON list: what the batcher joins into a batch."""
    return orjson.dumps(np.ascontiguousarray(rows), option=orjson.OPT_SERIALIZE_NUMPY)[1:-1]


def encode_infer_response(
    request: InferRequest,
    outputs: list[Any],
    output: TensorSpec,
    model_name: str,
    model_version: str,
) -> tuple[bytes, dict[str, str]]:
    """The v2 response body and headers; binary when the request asked for it."""
    try:
        array = np.asarray(outputs, dtype=output.dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        # the model server's answer, not the caller's request, is at fault
        raise UpstreamError(f"the model's outputs are not {output.datatype}: {exc}") from None
    tensor: dict[str, Any] = {
        "name": request.output_name,
        "datatype": output.datatype,
        "shape": list(array.shape),
    }
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        response["id"] = request.id
    response["outputs"] = [tensor]
    if not request.binary_output:
        tensor["data"] = array.reshape(-1)
        body = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
        return body, {"Content-Type": "application/json"}
    raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    tensor["parameters"] = {"binary_data_size": len(raw)}
    header = orjson.dumps(response)
    return header + raw, {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }


def model_metadata(
    name: str, versions: list[str], fmt: str | None, spec: TensorSpec, output: TensorSpec
) -> dict[str, Any]:
    """``GET /v2/models/{name}``: the model's tensors with the batch dimension first."""
    return {
        "name": name,
        "versions": versions,
        "platform": _PLATFORMS.get(fmt or "", "pytorch"),
        "inputs": [{"name": spec.name, "datatype": spec.datatype, "shape": spec.batch_shape()}],
        "outputs": [
            {"name": output.name, "datatype": output.datatype, "shape": output.batch_shape()}
        ],
    }
