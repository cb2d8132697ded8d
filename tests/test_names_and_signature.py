"""Names that become paths or keys, and signatures given at store time."""

from __future__ import annotations

import json

import pytest

from nexus_cli.errors import InvalidNameError, UsageError
from nexus_cli.names import (
    file_extension,
    refuse_control_chars,
    validate_commit_prefix,
    validate_model_name,
    validate_storage_key,
)
from nexus_cli.signature import parse_signature_json, signature_from_input_shape


@pytest.mark.parametrize("name", ["prod_model", "a", "Model-1.2_b", "9" * 128])
def test_valid_model_names(name: str) -> None:
    assert validate_model_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "../etc", "a/b", ".hidden", "-flag", "a b", "a" * 129, "é", "a\\b", "_x"]
)
def test_invalid_model_names(name: str) -> None:
    with pytest.raises(InvalidNameError):
        validate_model_name(name)


def test_commit_prefix() -> None:
    assert validate_commit_prefix("ABCD12") == "abcd12"
    for bad in ("abc", "xyz123", "a" * 41, ""):
        with pytest.raises(UsageError):
            validate_commit_prefix(bad)


@pytest.mark.parametrize(
    ("filename", "extension"),
    [("m.pt", ".pt"), ("m.PT2", ".pt2"), ("model.safetensors", ".safetensors"),
     ("weights", ""), ("a.b c", ""), ("archive.tar.gz", ".gz")],
)  # fmt: skip
def test_extension(filename: str, extension: str) -> None:
    assert file_extension(filename) == extension


@pytest.mark.parametrize("key", ["a/../b", "/a", "a//b", "a\\b", "a/./b", "", "a\0b"])
def test_storage_keys_that_escape(key: str) -> None:
    with pytest.raises(UsageError):
        validate_storage_key(key)


def test_signature_from_input_shape() -> None:
    assert signature_from_input_shape("3,224,224") == {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 224, 224]}],
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1]}],
    }
    for bad in ("", "a,b", "0", "3,-2"):
        with pytest.raises(UsageError):
            signature_from_input_shape(bad)


def test_signature_json() -> None:
    text = (
        '{"inputs": [{"name": "x", "datatype": "INT64", "shape": [-1, 16]}],'
        ' "outputs": [{"name": "y", "datatype": "FP16", "shape": [-1, 2]}]}'
    )
    assert parse_signature_json(text)["inputs"][0]["datatype"] == "INT64"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not valid JSON"),
        ('{"inputs": []}', "exactly 'inputs' and 'outputs'"),
        ('{"inputs": [], "outputs": []}', "at least one input"),
        ('{"inputs": [{"name": "x", "datatype": "FLOAT", "shape": [-1]}], "outputs": []}',
         "datatype"),
        ('{"inputs": [{"name": "x", "datatype": "FP32", "shape": [0]}], "outputs": []}', "shape"),
        ('{"inputs": [{"name": "", "datatype": "FP32", "shape": [-1]}], "outputs": []}', "name"),
    ],
)  # fmt: skip
def test_bad_signatures_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_signature_json(text)


@pytest.mark.parametrize("text", ["a\x1b[2J", "line\nbreak", "tab\there", "bell\x07", "\x9b",
                                  "rtl\u202eoverride", "del\x7f"])  # fmt: skip
def test_control_characters_are_refused(text: str) -> None:
    with pytest.raises(UsageError, match="control character"):
        refuse_control_chars(text, "the message")


def test_printable_text_passes() -> None:
    assert refuse_control_chars("café ● [bold]x[/] 😀", "m") == "café ● [bold]x[/] 😀"


@pytest.mark.parametrize("dims", ["8,,8", "8,", ",8", "8;8", "1e3", "0", "-2", str(2**63)])
def test_bad_input_shapes(dims: str) -> None:
    with pytest.raises(UsageError, match="--input-shape"):
        signature_from_input_shape(dims)


def test_largest_int64_dimension_passes_and_one_more_does_not() -> None:
    assert signature_from_input_shape(str(2**63 - 1))["inputs"][0]["shape"] == [-1, 2**63 - 1]
    tensor = {"name": "x", "datatype": "FP32", "shape": [-1, 2**63]}
    with pytest.raises(UsageError, match="2\\*\\*63-1"):
        parse_signature_json(json.dumps({"inputs": [tensor], "outputs": []}))


def test_duplicate_tensor_names_are_refused() -> None:
    tensor = {"name": "x", "datatype": "FP32", "shape": [-1]}
    with pytest.raises(UsageError, match="used twice"):
        parse_signature_json(json.dumps({"inputs": [tensor, tensor], "outputs": []}))
    same_name_in_and_out = {"inputs": [tensor], "outputs": [tensor]}
    assert parse_signature_json(json.dumps(same_name_in_and_out))["outputs"][0]["name"] == "x"


def test_a_signature_nested_past_the_parser_s_depth_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="--signature"):
        parse_signature_json("[" * 60_000)


@pytest.mark.parametrize(
    "call",
    [
        lambda text: signature_from_input_shape(text),
        lambda text: validate_commit_prefix(text),
    ],
)
def test_errors_quote_a_long_argument_shortened(call) -> None:
    """An error is one line for a person: a 5,000-character argument is not echoed whole."""
    with pytest.raises(UsageError) as caught:
        call("9" * 5000 + "x")
    assert len(str(caught.value)) < 300
