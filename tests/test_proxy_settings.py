"""Proxy settings: defaults, and a message naming the variable for every bad value."""

from __future__ import annotations

import pytest

from proxy.settings import MIB, Settings, SettingsError


def test_defaults_follow_the_contract() -> None:
    settings = Settings.from_env({})
    assert settings.model_server_urls == ("http://127.0.0.1:8000",)
    assert settings.max_batch_size == 32
    assert settings.max_wait_ms == 50
    assert settings.max_queue == 1024
    assert settings.request_timeout_s == 30
    assert settings.max_body_bytes == 64 * MIB
    assert (settings.host, settings.port) == ("127.0.0.1", 8080)
    assert settings.api_token is None
    assert settings.model_server_token is None
    assert settings.etcd_endpoints == ()
    assert settings.etcd_ttl_s == 10


def test_lists_tokens_and_numbers_are_read() -> None:
    settings = Settings.from_env(
        {
            "NEXUS_MODEL_SERVER_URL": " http://a:1/ , http://b:2 ",
            "NEXUS_API_TOKEN": "front",
            "NEXUS_MAX_BATCH_SIZE": "8",
            "NEXUS_MAX_WAIT_MS": "2.5",
            "NEXUS_ETCD_ENDPOINTS": "http://e1:2379,http://e2:2379",
            "NEXUS_ADVERTISE_URL": "http://10.0.0.5:8080",
            "NEXUS_INSTANCE_ID": "proxy-a",
        }
    )
    assert settings.model_server_urls == ("http://a:1", "http://b:2")
    assert settings.model_server_token == "front"  # NEXUS_API_TOKEN by default
    assert (settings.max_batch_size, settings.max_wait_ms) == (8, 2.5)
    assert settings.etcd_endpoints == ("http://e1:2379", "http://e2:2379")
    assert settings.instance_id == "proxy-a"
    hop = Settings.from_env({"NEXUS_API_TOKEN": "front", "NEXUS_MODEL_SERVER_TOKEN": "hop"})
    assert hop.model_server_token == "hop"
    assert "front" not in repr(hop)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"NEXUS_MODEL_SERVER_URL": "127.0.0.1:8000"}, "NEXUS_MODEL_SERVER_URL"),
        ({"NEXUS_MODEL_SERVER_URL": " , "}, "NEXUS_MODEL_SERVER_URL"),
        ({"NEXUS_MODEL_SERVER_URL": "http://h:99999"}, "NEXUS_MODEL_SERVER_URL"),
        ({"NEXUS_MAX_BATCH_SIZE": "0"}, "NEXUS_MAX_BATCH_SIZE"),
        ({"NEXUS_MAX_BATCH_SIZE": "4.5"}, "NEXUS_MAX_BATCH_SIZE"),
        ({"NEXUS_MAX_WAIT_MS": "-1"}, "NEXUS_MAX_WAIT_MS"),
        ({"NEXUS_MAX_WAIT_MS": "nan"}, "NEXUS_MAX_WAIT_MS"),
        ({"NEXUS_MAX_QUEUE": "lots"}, "NEXUS_MAX_QUEUE"),
        ({"NEXUS_REQUEST_TIMEOUT_S": "0"}, "NEXUS_REQUEST_TIMEOUT_S"),
        ({"NEXUS_MAX_BODY_BYTES": "-5"}, "NEXUS_MAX_BODY_BYTES"),
        ({"NEXUS_PORT": "http"}, "NEXUS_PORT"),
        ({"NEXUS_ETCD_ENDPOINTS": "http://e:2379"}, "NEXUS_ADVERTISE_URL"),
        (
            {"NEXUS_ETCD_ENDPOINTS": "http://e:2379", "NEXUS_ADVERTISE_URL": "host:80"},
            "NEXUS_ADVERTISE_URL",
        ),
        ({"NEXUS_ETCD_TTL_S": "0.1"}, "NEXUS_ETCD_TTL_S"),
        ({"NEXUS_INSTANCE_ID": "a/b"}, "NEXUS_INSTANCE_ID"),
        ({"NEXUS_LOG_LEVEL": "loud"}, "NEXUS_LOG_LEVEL"),
    ],
)
def test_bad_values_name_their_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        Settings.from_env(env)
