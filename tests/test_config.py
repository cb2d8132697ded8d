"""`.nexusrc` parsing, defaults, environment overrides and the refusal of secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from nexus_cli.config import StorageConfig, load_config, parse_config, render_config, resolve_config
from nexus_cli.errors import ConfigError


def test_no_file_means_the_local_store(tmp_path: Path) -> None:
    assert load_config(tmp_path / ".nexusrc", environ={}) == StorageConfig(
        provider="local", path=".nexus/store"
    )


def test_file_values_and_environment_overrides(tmp_path: Path) -> None:
    rc = tmp_path / ".nexusrc"
    rc.write_text('[storage]\nprovider = "s3"\nbucket = "from-file"\nprefix = "/team/a/"\n')
    config = load_config(rc, environ={"NEXUS_BUCKET": "from-env", "NEXUS_REGION": "eu-west-1"})
    assert config.provider == "s3"
    assert config.bucket == "from-env"
    assert config.region == "eu-west-1"
    assert config.prefix == "team/a"


def test_environment_can_switch_provider(tmp_path: Path) -> None:
    config = load_config(
        tmp_path / "missing",
        environ={"NEXUS_PROVIDER": "minio", "NEXUS_BUCKET": "bkt",
                 "NEXUS_ENDPOINT_URL": "http://127.0.0.1:9000"},
    )  # fmt: skip
    assert (config.provider, config.endpoint_url) == ("minio", "http://127.0.0.1:9000")


@pytest.mark.parametrize(
    "text",
    [
        '[storage]\naws_secret_access_key = "abc"\n',
        '[storage]\nprovider = "s3"\nbucket = "bkt"\naccess_key_id = "AKIA"\n',
        '[storage]\npassword = "hunter2"\n',
        '[credentials]\ntoken = "x"\n',
    ],
)
def test_secret_looking_keys_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="secret-looking key"):
        parse_config(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[storage\n", "not valid TOML"),
        ('[storage]\nbukket = "b"\n', "unknown key"),
        ("[storage]\npath = 3\n", "must be a string"),
        ('[other]\nx = "1"\n', "unknown table"),
    ],
)
def test_malformed_files_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(text)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"provider": "ftp"}, "unknown storage provider"),
        ({"provider": "s3"}, "needs a bucket"),
        ({"provider": "minio", "bucket": "bkt"}, "needs an endpoint"),
        ({"provider": "s3", "bucket": "bkt", "endpoint_url": "127.0.0.1:9000"}, "http"),
        ({"provider": "s3", "bucket": "bkt", "prefix": "a/../b"}, r"\.\."),
    ],
)
def test_invalid_settings_are_refused(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_config(values, environ={})


def test_render_round_trips() -> None:
    config = StorageConfig(provider="s3", bucket="b-1.x", prefix='odd "name"', region="us-east-1")
    assert resolve_config(parse_config(render_config(config)), environ={}) == config


def test_endpoint_with_credentials_is_refused() -> None:
    values = {
        "provider": "minio",
        "bucket": "bkt",
        "endpoint_url": "http://key:secret@127.0.0.1:9000",
    }
    with pytest.raises(ConfigError, match="must not hold credentials"):
        resolve_config(values, environ={})


@pytest.mark.parametrize(
    ("provider", "bucket"),
    [("s3", "ab"), ("s3", "a" * 64), ("s3", "My_Bucket"), ("minio", "-bucket"), ("s3", "bucket-"),
     ("s3", "a..b"), ("s3", "192.168.1.1"), ("gcs", "UPPER"), ("s3", "under_score")],
)  # fmt: skip
def test_invalid_bucket_names_are_refused_at_config_time(provider: str, bucket: str) -> None:
    values = {"provider": provider, "bucket": bucket, "endpoint_url": "http://127.0.0.1:9"}
    with pytest.raises(ConfigError, match="invalid bucket name"):
        resolve_config(values, environ={})


@pytest.mark.parametrize(
    ("provider", "bucket"), [("s3", "abc"), ("s3", "my.models-2"), ("gcs", "team_models")]
)
def test_valid_bucket_names_pass(provider: str, bucket: str) -> None:
    assert resolve_config({"provider": provider, "bucket": bucket}, environ={}).bucket == bucket


def test_a_named_config_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "typo.nexusrc", environ={}, must_exist=True)


def test_a_byte_order_mark_is_read_past(tmp_path: Path) -> None:
    """Windows editors save UTF-8 with a BOM; tomllib called it an invalid statement."""
    path = tmp_path / ".nexusrc"
    path.write_bytes('\ufeff[storage]\nprovider = "s3"\nbucket = "models"\n'.encode())
    assert load_config(path, environ={}).bucket == "models"
