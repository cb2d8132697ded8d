"""The request codec in-process: grouping by shape, order, where an error is, outputs."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from model_server.codec import check_outputs, decode_batch, encode_outputs
from nexus_cli.serving import BadRequest, InvalidInput, PayloadTooLarge, TensorSpec

ANY = TensorSpec("input")
EIGHT = TensorSpec("input", "FP32", (8,))
INTS = TensorSpec("input", "INT64", (2,))
MODEL = {"name": "m", "commit_hash": "c" * 40}


def body(inputs: object) -> bytes:
    return orjson.dumps({"inputs": inputs})


def test_one_shape_is_one_group_in_order() -> None:
    batch = decode_batch(body([[float(i)] * 8 for i in range(5)]), EIGHT, 64)
    assert batch.count == 5
    assert len(batch.groups) == 1
    group = batch.groups[0]
    assert group.indices is None
    assert group.array.dtype == np.float32
    assert group.array.shape == (5, 8)
    assert group.array.flags.c_contiguous


def test_several_shapes_group_and_come_back_in_order() -> None:
    inputs = [[1.0, 2.0], [[1.0, 2.0]], [3.0, 4.0], [[3.0, 4.0]], [5.0, 6.0]]
    batch = decode_batch(body(inputs), ANY, 64)
    assert [(g.array.shape, g.indices) for g in batch.groups] == [
        ((3, 2), [0, 2, 4]),
        ((2, 1, 2), [1, 3]),
    ]
    outputs = [g.array * 10 for g in batch.groups]  # a "model" that keeps the shape
    answer = orjson.loads(encode_outputs(batch, outputs, MODEL))
    assert answer["outputs"] == [
        [10.0, 20.0], [[10.0, 20.0]], [30.0, 40.0], [[30.0, 40.0]], [50.0, 60.0]
    ]  # fmt: skip
    assert answer["model"] == MODEL


def test_integer_signature_keeps_integers_and_checks_range() -> None:
    batch = decode_batch(body([[1, 2], [3, 4]]), INTS, 64)
    assert batch.groups[0].array.dtype == np.int64
    with pytest.raises(InvalidInput, match=r"inputs\[1\]: expected integers"):
        decode_batch(body([[1, 2], [3, 4.5]]), INTS, 64)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([[1.0] * 8, [1.0] * 8, [True] + [1.0] * 7], r"inputs\[2\]: .* got a boolean"),
        ([[1.0] * 8, [None] * 8], r"inputs\[1\]: .* got null"),
        ([[1.0] * 8, [1.0] * 9], r"inputs\[1\]: expected shape \[8\], got \[9\]"),
        ([[1.0] * 8, [[1.0] * 8, [1.0]]], r"inputs\[1\]: not a rectangular"),
        ([[1.0] * 7 + [3.5e38 * 10]], r"inputs\[0\]: a value is outside FP32's range"),
        ([], r"empty batch"),
    ],
)
def test_errors_name_the_sample(inputs: list, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        decode_batch(body(inputs), EIGHT, 64)


def test_numbers_in_strings_are_refused() -> None:
    """numpy would happily read "1.5" as a number; the contract says numbers only."""
    with pytest.raises(InvalidInput, match=r"inputs\[1\]: expected numbers \(FP32\), got strings"):
        decode_batch(body([[1.0] * 8, ["1.5"] * 8]), EIGHT, 64)
    with pytest.raises(InvalidInput, match=r"inputs\[0\]: expected numbers"):
        decode_batch(body([[1.0] * 7 + ["2"]]), EIGHT, 64)


def test_a_boolean_among_numbers_is_found_although_numpy_would_take_it() -> None:
    assert np.asarray([1.0, True]).dtype == np.float64  # why the raw bytes are checked
    with pytest.raises(InvalidInput, match=r"inputs\[0\]: .* got a boolean"):
        decode_batch(b'{"inputs": [[1, 2, 3, 4, 5, 6, 7, true]]}', EIGHT, 64)
    # a "true" inside a string elsewhere in the body does not refuse good samples
    fine = decode_batch(b'{"inputs": [[1, 2, 3, 4, 5, 6, 7, 8]], "note": "true"}', EIGHT, 64)
    assert fine.count == 1


def test_booleans_for_a_bool_signature() -> None:
    spec = TensorSpec("input", "BOOL", (2,))
    batch = decode_batch(b'{"inputs": [[true, false]]}', spec, 64)
    assert batch.groups[0].array.dtype == np.bool_


def test_over_max_batch() -> None:
    with pytest.raises(PayloadTooLarge, match="at most 3"):
        decode_batch(body([[1.0] * 8] * 4), EIGHT, 3)


def test_more_numbers_than_fit_are_refused_before_parsing() -> None:
    """A body of tiny numbers costs ~15x its size once parsed: with a known sample shape
    it is refused by counting commas, before any parsing (the cut-off body below is not
    even JSON, and the answer is still 413, not 400)."""
    flood = b'{"inputs": [' + b"0," * 600_000  # 1.2 MB, no closing brackets: never parsed
    with pytest.raises(PayloadTooLarge, match="more numbers than 1024 samples of shape") as caught:
        decode_batch(flood, EIGHT, 1024)
    assert caught.value.code == "batch_too_large"
    # under 1 MiB the body is parsed (cheaper than counting) and still refused
    small_flood = b'{"inputs": [' + b"0," * 200_000 + b"0]}"
    with pytest.raises(PayloadTooLarge, match="at most 1024") as caught:
        decode_batch(small_flood, EIGHT, 1024)
    assert caught.value.code == "batch_too_large"
    # a full batch, nested and spaced any way, is under the bound
    assert decode_batch(body([[[1.0] * 4] * 2] * 1024), TensorSpec("x", "FP32", (2, 4)), 1024)
    # a free dimension leaves the count to the parser: the bound would be a guess
    with pytest.raises(BadRequest, match="not valid JSON"):
        decode_batch(flood, TensorSpec("x", "FP32", (-1,)), 1024)


def test_non_finite_output_names_the_sample_in_request_order() -> None:
    inputs = [[1.0, 2.0], [[1.0, 2.0]], [3.0, 4.0]]
    batch = decode_batch(body(inputs), ANY, 64)
    outputs = [g.array.copy() for g in batch.groups]
    outputs[0][1, 0] = np.nan  # second row of the first group: request index 2
    with pytest.raises(InvalidInput, match=r"outputs\[2\]: the model produced a non-finite") as e:
        check_outputs(batch, outputs)
    assert e.value.code == "non_finite_output"
    check_outputs(batch, [g.array for g in batch.groups])  # finite: no error
