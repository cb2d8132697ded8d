"""Names that become paths or keys, and signatures given at store time."""

from __future__ import annotations

import pytest

from nexus_cli.errors import InvalidNameError, UsageError
from nexus_cli.names import (
    file_extension,
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
