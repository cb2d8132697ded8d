"""Model signatures: named tensors with v2 (Open Inference Protocol) datatypes and shapes.

The first dimension of every shape is the batch; ``-1`` marks a dimension that is free
or not known.
"""

from __future__ import annotations

import json
import re
from typing import Any

from nexus_cli.errors import UsageError
from nexus_cli.names import refuse_control_chars, shown

DATATYPES = (
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "BF16", "FP32", "FP64", "BYTES",
)  # fmt: skip
#: dimensions are int64 in every runtime that reads them (torch, numpy, KServe v2)
MAX_DIMENSION = 2**63 - 1


def _check_tensors(value: Any, where: str) -> list[dict]:
    if not isinstance(value, list):
        raise UsageError(f"{where} must be a list of tensors")
    checked = []
    names: set[str] = set()
    for index, tensor in enumerate(value):
        at = f"{where}[{index}]"
        if not isinstance(tensor, dict) or set(tensor) != {"name", "datatype", "shape"}:
            raise UsageError(f"{at} must be an object with exactly name, datatype and shape")
        name, datatype, shape = tensor["name"], tensor["datatype"], tensor["shape"]
        if not isinstance(name, str) or not name:
            raise UsageError(f"{at}.name must be a non-empty string")
        refuse_control_chars(name, f"{at}.name")
        if name in names:
            raise UsageError(f"{at}.name {name!r} is used twice in {where}")
        names.add(name)
        if datatype not in DATATYPES:
            raise UsageError(f"{at}.datatype {datatype!r} is not one of {', '.join(DATATYPES)}")
        if (
            not isinstance(shape, list)
            or not shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in shape)
            or 0 in shape
            or any(d > MAX_DIMENSION for d in shape)
        ):
            raise UsageError(
                f"{at}.shape must be a non-empty list of positive integers (at most 2**63-1) "
                "or -1 (the first being the batch)"
            )
        checked.append({"name": name, "datatype": datatype, "shape": list(shape)})
    return checked


def validate_signature(value: Any) -> dict:
    """Return ``value`` as a clean signature dict, or raise ``UsageError`` saying what is wrong."""
    if not isinstance(value, dict) or set(value) != {"inputs", "outputs"}:
        raise UsageError("a signature must be an object with exactly 'inputs' and 'outputs'")
    inputs = _check_tensors(value["inputs"], "inputs")
    if not inputs:
        raise UsageError("a signature needs at least one input")
    return {"inputs": inputs, "outputs": _check_tensors(value["outputs"], "outputs")}


def parse_signature_json(text: str) -> dict:
    """Parse ``--signature JSON``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--signature is not valid JSON: {exc.msg} at column {exc.colno}") from exc
    except RecursionError as exc:
        raise UsageError("--signature is nested too deeply to be a signature") from exc
    return validate_signature(value)


def signature_from_input_shape(dims: str, datatype: str = "FP32") -> dict:
    """Build a signature from ``--input-shape 3,224,224``: one sample's shape, no batch."""
    parts = [part.strip() for part in dims.replace("x", ",").split(",")]
    if not all(re.fullmatch(r"-1|[0-9]{1,19}", part) for part in parts):
        raise UsageError(
            f"--input-shape {shown(dims)}: give the dimensions of one sample, like 8 or 3,224,224 "
            "(positive integers or -1, separated by commas)"
        )
    shape = [int(part) for part in parts]
    if any(d == 0 or d > MAX_DIMENSION for d in shape):
        raise UsageError(
            f"--input-shape {shown(dims)}: dimensions must be positive integers "
            "(at most 2**63-1) or -1"
        )
    return validate_signature(
        {
            "inputs": [{"name": "input", "datatype": datatype, "shape": [-1, *shape]}],
            "outputs": [{"name": "output", "datatype": datatype, "shape": [-1]}],
        }
    )
