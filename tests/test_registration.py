"""Service registration against a real etcd on 127.0.0.1 (SPEC section 7)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.registration import (
    SERVICE_PREFIX,
    Registration,
    RegistrationError,
    registration_from_env,
)
from tests import etcd_server
from tests.cloud_servers import free_port
from tests.etcd_server import Etcd, run_etcd, wait_until

METADATA = {"schema_version": "v1", "model": {"name": "demo_model", "commit_hash": "ab" * 20}}


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etcd]:
    """One etcd for the session; tests keep apart by using their own instance ids."""
    with run_etcd(tmp_path_factory.mktemp("etcd")) as server:
        yield server


def _run(coroutine):
    return asyncio.run(coroutine)


# against a live etcd --------------------------------------------------------------------


def test_key_appears_with_a_live_lease_and_disappears_on_stop(etcd: Etcd) -> None:
    registration = Registration([etcd.url], "http://10.0.0.5:8080", ttl_s=5, instance_id="a-1")

    async def scenario() -> tuple[dict | None, int, dict | None]:
        await registration.start(METADATA)
        while_running = etcd.get(registration.key)
        ttl = etcd.lease_ttl(registration.lease_id)
        lease = registration.lease_id
        await registration.stop()
        return while_running, ttl, {"lease": lease, "after": etcd.get(registration.key)}

    entry, ttl, after = _run(scenario())
    assert registration.key == SERVICE_PREFIX + "a-1" == "/nexus/services/nexus-proxy/a-1"
    assert entry is not None, "the key should exist once start() returns"
    assert json.loads(entry["value"]) == {"url": "http://10.0.0.5:8080", "metadata": METADATA}
    assert entry["lease"] == after["lease"], "the key must be held by the registration's lease"
    assert 0 < ttl <= 5
    assert after["after"] is None, "stop() must remove the key at once"
    assert etcd.lease_ttl(after["lease"]) == -1, "stop() must revoke the lease"


def test_keepalive_outlives_the_ttl(etcd: Etcd) -> None:
    registration = Registration([etcd.url], "http://h:8080", ttl_s=2, instance_id="keepalive")

    async def scenario() -> dict | None:
        await registration.start(METADATA)
        await asyncio.sleep(5)  # 2.5 TTLs: gone by now unless kept alive
        entry = etcd.get(registration.key)
        await registration.stop()
        return entry

    assert _run(scenario()) is not None


def test_a_lost_lease_is_replaced_and_the_key_written_again(etcd: Etcd) -> None:
    registration = Registration([etcd.url], "http://h:8080", ttl_s=3, instance_id="relost")

    async def scenario() -> tuple[str, dict | None]:
        await registration.start(METADATA)
        first = registration.lease_id
        etcd.revoke(first)  # what an etcd restart or a long partition does
        assert etcd.get(registration.key) is None
        deadline = time.monotonic() + 15
        while etcd.get(registration.key) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        entry = etcd.get(registration.key)
        await registration.stop()
        return first, entry

    first, entry = _run(scenario())
    assert entry is not None, "the registration should come back under a new lease"
    assert entry["lease"] != first


def test_update_rewrites_the_metadata_under_the_same_lease(etcd: Etcd) -> None:
    registration = Registration([etcd.url], "http://h:8080", ttl_s=5, instance_id="updated")
    newer = {**METADATA, "model": {"name": "demo_model", "commit_hash": "cd" * 20}}

    async def scenario() -> tuple[str, dict | None]:
        await registration.start(METADATA)
        lease = registration.lease_id
        await registration.update(newer)
        entry = etcd.get(registration.key)
        await registration.stop()
        return lease, entry

    lease, entry = _run(scenario())
    assert entry is not None
    assert entry["lease"] == lease
    assert json.loads(entry["value"])["metadata"] == newer


def test_fails_over_to_the_next_endpoint(etcd: Etcd) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    registration = Registration([dead, etcd.url], "http://h:8080", ttl_s=5, instance_id="failover")

    async def scenario() -> dict | None:
        await registration.start(METADATA)
        entry = etcd.get(registration.key)
        await registration.stop()
        return entry

    assert _run(scenario()) is not None
    assert etcd.get(registration.key) is None


def test_unreachable_etcd_does_not_block_start_and_registration_follows_later(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    registration = Registration(
        [f"http://127.0.0.1:{port}"], "http://h:8080", ttl_s=2, instance_id="late"
    )

    async def scenario() -> tuple[float, dict | None, dict | None]:
        began = time.monotonic()
        await registration.start(METADATA)  # nothing listens yet: logs, keeps trying
        took = time.monotonic() - began
        with run_etcd(tmp_path / "late-etcd", client_port=port) as late:
            deadline = time.monotonic() + 20
            while late.get(registration.key) is None and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            entry = late.get(registration.key)
            await registration.stop()
            return took, entry, late.get(registration.key)

    with caplog.at_level("WARNING", logger="proxy.registration"):
        took, entry, after = _run(scenario())
    assert took < 10, "start() must not wait for etcd"
    assert "retrying in the background" in caplog.text
    assert entry is not None, "the background task should register once etcd is up"
    assert after is None


def test_start_and_stop_are_bounded_when_etcd_accepts_but_never_answers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as first, socket.socket() as second:
        for silent in (first, second):  # connections queue in the backlog, never answered
            silent.bind(("127.0.0.1", 0))
            silent.listen(16)
        endpoints = [f"http://127.0.0.1:{s.getsockname()[1]}" for s in (first, second)]
        registration = Registration(endpoints, "http://h:8080", ttl_s=2, instance_id="silent")

        async def scenario() -> tuple[float, float]:
            began = time.monotonic()
            await registration.start(METADATA)
            started = time.monotonic() - began
            began = time.monotonic()
            await registration.stop()
            return started, time.monotonic() - began

        with caplog.at_level("WARNING", logger="proxy.registration"):
            started, stopped = _run(scenario())
    assert started < 8, "the first try is bounded (5 s), whatever the endpoints do"
    assert stopped < 5
    assert "retrying in the background" in caplog.text


def test_stop_is_bounded_when_etcd_is_gone() -> None:
    registration = Registration(
        [f"http://127.0.0.1:{free_port()}"], "http://h:8080", ttl_s=2, instance_id="gone"
    )

    async def scenario() -> float:
        await registration.start(METADATA)
        began = time.monotonic()
        await registration.stop()
        return time.monotonic() - began

    assert _run(scenario()) < 10


def _start_proxy(etcd: Etcd, tmp_path: Path, name: str) -> tuple[subprocess.Popen, str]:
    """A real ``python -m proxy`` registering in ``etcd`` (its model server is absent:
    registration does not wait for one)."""
    port = free_port()
    advertise = f"http://10.1.2.3:{port}"
    env = {
        **os.environ,
        "NEXUS_PORT": str(port),
        "NEXUS_MODEL_SERVER_URL": f"http://127.0.0.1:{free_port()}",
        "NEXUS_ETCD_ENDPOINTS": etcd.url,
        "NEXUS_ADVERTISE_URL": advertise,
        "NEXUS_ETCD_TTL_S": "3",
    }
    with open(tmp_path / f"{name}.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy"], env=env, stdout=log, stderr=subprocess.STDOUT,
            cwd=Path(__file__).parent.parent,
        )  # fmt: skip
    return process, advertise


def _registered_as(etcd: Etcd, advertise: str) -> str | None:
    for key in etcd.keys(SERVICE_PREFIX):
        entry = etcd.get(key)
        if entry is not None and json.loads(entry["value"])["url"] == advertise:
            return key
    return None


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_proxy_process_registers_and_leaves_when_stopped_or_killed(
    etcd: Etcd, tmp_path: Path, how: str
) -> None:
    process, advertise = _start_proxy(etcd, tmp_path, how)
    try:
        wait_until(lambda: _registered_as(etcd, advertise) is not None, timeout=30,
                   what="the proxy to register")  # fmt: skip
        key = _registered_as(etcd, advertise)
        entry = etcd.get(key)
        document = json.loads(entry["value"])
        assert document["metadata"]["schema_version"] == "v1", "its /v1/metadata document"
        assert etcd.lease_ttl(entry["lease"]) > 0
        os.kill(process.pid, getattr(signal, how))
        process.wait(timeout=30)
        if how == "SIGTERM":
            # a clean shutdown revokes the lease: the key goes at once
            assert etcd.get(key) is None
            assert etcd.lease_ttl(entry["lease"]) == -1
        else:
            # no shutdown hook runs: the lease outlives the process until its TTL is up
            assert etcd.lease_ttl(entry["lease"]) > 0
            wait_until(lambda: etcd.get(key) is None, timeout=15, what="the lease to expire")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


# a machine without etcd ------------------------------------------------------------------


@pytest.fixture
def no_etcd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(etcd_server, "FALLBACK_PATHS", ())


@pytest.mark.usefixtures("no_etcd")
def test_without_etcd_a_developer_gets_a_skip_that_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install etcd-server"):
        etcd_server.etcd_binary()


@pytest.mark.usefixtures("no_etcd")
def test_without_etcd_ci_fails_instead_of_skipping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true and etcd is not installed"):
        etcd_server.etcd_binary()


# settings -------------------------------------------------------------------------------


def test_from_env_is_none_without_endpoints() -> None:
    assert registration_from_env({}) is None
    assert registration_from_env({"NEXUS_ETCD_ENDPOINTS": "  "}) is None


def test_from_env_reads_every_variable() -> None:
    registration = registration_from_env({
        "NEXUS_ETCD_ENDPOINTS": "http://10.0.0.1:2379, 10.0.0.2:2379",
        "NEXUS_ADVERTISE_URL": "http://10.0.0.5:8080/",
        "NEXUS_ETCD_TTL_S": "4",
        "NEXUS_INSTANCE_ID": "proxy-a",
    })  # fmt: skip
    assert registration is not None
    assert registration.endpoints == ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
    assert registration.advertise_url == "http://10.0.0.5:8080"
    assert registration.ttl_s == 4
    assert registration.key == "/nexus/services/nexus-proxy/proxy-a"


def test_default_instance_ids_differ() -> None:
    first = Registration(["http://e:2379"], "http://h:8080", ttl_s=10)
    second = Registration(["http://e:2379"], "http://h:8080", ttl_s=10)
    assert first.key != second.key
    assert first.key.startswith(SERVICE_PREFIX)


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"NEXUS_ETCD_ENDPOINTS": "http://e:2379"}, "NEXUS_ADVERTISE_URL is required"),
        ({"NEXUS_ADVERTISE_URL": "h:8080"}, "must start with http"),
        ({"NEXUS_ADVERTISE_URL": "http://h:8080", "NEXUS_ETCD_TTL_S": "ten"}, "NEXUS_ETCD_TTL_S"),
        ({"NEXUS_ADVERTISE_URL": "http://h:8080", "NEXUS_ETCD_TTL_S": "0.5"}, "at least 1"),
        ({"NEXUS_ADVERTISE_URL": "http://h:8080", "NEXUS_ETCD_TTL_S": "nan"}, "at least 1"),
        ({"NEXUS_ADVERTISE_URL": "http://h:8080", "NEXUS_INSTANCE_ID": "a/b"}, "instance id"),
    ],
)
def test_from_env_refuses_bad_settings(env: dict[str, str], names: str) -> None:
    env = {"NEXUS_ETCD_ENDPOINTS": "http://e:2379", **env}
    with pytest.raises(RegistrationError, match=names):
        registration_from_env(env)


def test_refuses_a_non_http_endpoint() -> None:
    with pytest.raises(RegistrationError, match="http:// or https://"):
        Registration(["ftp://e:2379"], "http://h:8080", ttl_s=10)
