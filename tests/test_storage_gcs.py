"""The GCS backend against emulators on 127.0.0.1: the storage contract, then GCS's own cases."""

from __future__ import annotations

import itertools
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import requests
from google.api_core import exceptions as api_errors
from google.cloud import storage

from nexus_cli.config import StorageConfig
from nexus_cli.errors import IntegrityError, ObjectExistsError, StorageError
from nexus_cli.storage import gcs, open_store
from nexus_cli.storage.gcs import TEMP_ROOT, GCSStore, is_transient
from nexus_cli.transfer import byte_ranges
from tests.storage_contract import (
    StorageContract,
    assert_missing_bucket_everywhere,
    digest_of,
    write,
)

pytest_plugins = ["tests.cloud_servers"]

MiB = 1024 * 1024


def small_parts_store(bucket: str, **kwargs: Any) -> GCSStore:
    """A store whose composite path starts above 6 MiB, in 4 MiB parts."""
    options = {"part_size": 4 * MiB, "parallel_threshold": 6 * MiB, "max_concurrency": 4}
    return GCSStore(bucket, **{**options, **kwargs})


def leave_temporary_part(store: GCSStore) -> str:
    """A part of a composite upload that was killed before it cleaned up."""
    name = f"{TEMP_ROOT}/0123456789abcdef/00001"
    store._bucket.blob(store._name(name)).upload_from_string(b"p" * 100)
    return name


class TestGCSContract(StorageContract):
    """On fake-gcs-server, which enforces ifGenerationMatch on single-request uploads."""

    @pytest.fixture
    def store(self, gcs_bucket: str) -> GCSStore:
        return small_parts_store(gcs_bucket)

    def leave_leftover(self, store: GCSStore, tmp_path: Path) -> str:
        return leave_temporary_part(store)


class TestGCSContractOnTheOtherEmulator(StorageContract):
    """The same promises on gcp-storage-emulator, which ignores generation preconditions."""

    @pytest.fixture
    def store(self, emulator_bucket: str) -> GCSStore:
        return small_parts_store(emulator_bucket)

    def leave_leftover(self, store: GCSStore, tmp_path: Path) -> str:
        return leave_temporary_part(store)

    # This emulator ignores ifGenerationMatch, so it cannot show create-only writes; they
    # run against fake-gcs-server above and are checked at the request level below.
    _IGNORES_PRECONDITIONS = (
        "gcp-storage-emulator ignores ifGenerationMatch (fake-gcs-server runs it)"
    )

    @pytest.mark.skip(reason=_IGNORES_PRECONDITIONS)
    def test_create_only_put_refuses_a_taken_key(self) -> None: ...

    @pytest.mark.skip(reason=_IGNORES_PRECONDITIONS)
    def test_concurrent_create_only_puts_have_one_winner(self) -> None: ...


@dataclass
class Sent:
    method: str
    url: str
    headers: dict

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.url).query)

    @property
    def path(self) -> str:
        return unquote(urlsplit(self.url).path)


class Wire:
    """Every HTTP request a store's client sends, with ways to answer some of them instead,
    or to lose the reply to one that the server did carry out."""

    def __init__(self, store: GCSStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent: list[Sent] = []
        self._answers: list[tuple[Callable[[Sent], bool], int]] = []
        self._lost: list[Callable[[Sent], bool]] = []
        self._lock = threading.Lock()  # parts go up on several threads
        session = store._client._http
        real = session.request

        def request(method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
            sent = Sent(method, url, dict(kwargs.get("headers") or {}))
            with self._lock:
                self.sent.append(sent)
                answer = next((a for a in self._answers if a[0](sent)), None)
                if answer is not None:
                    self._answers.remove(answer)
            if answer is not None:
                return fake_response(answer[1], method, url)
            response = real(method, url, *args, **kwargs)
            with self._lock:
                lost = next((m for m in self._lost if m(sent)), None)
                if lost is not None:
                    self._lost.remove(lost)
            if lost is not None:
                raise requests.ConnectionError("injected: the reply was lost")
            return response

        monkeypatch.setattr(session, "request", request)

    def answer_once(self, matches: Callable[[Sent], bool], status: int) -> None:
        self._answers.append((matches, status))

    def lose_reply_once(self, matches: Callable[[Sent], bool]) -> None:
        """Carry out the first matching request, then raise as if the connection dropped
        before its reply arrived; the SDK retries it."""
        self._lost.append(matches)

    def uploads(self) -> list[Sent]:
        return [s for s in self.sent if s.method == "POST" and "/upload/" in s.path]

    def composes(self) -> list[Sent]:
        return [s for s in self.sent if s.path.endswith("/compose")]


def fake_response(status: int, method: str, url: str) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response.url = url
    response.request = requests.Request(method, url).prepare()
    response.headers["Content-Type"] = "application/json"
    response._content = json.dumps({"error": {"code": status, "message": "injected"}}).encode()
    return response


def payload(tmp_path: Path, name: str, size: int) -> tuple[Path, bytes]:
    data = os.urandom(size)
    return write(tmp_path, name, data), data


@pytest.fixture
def store(gcs_bucket: str) -> GCSStore:
    return small_parts_store(gcs_bucket)


@pytest.fixture
def wire(store: GCSStore, monkeypatch: pytest.MonkeyPatch) -> Wire:
    return Wire(store, monkeypatch)


# create-only, at the request level ------------------------------------------------------


def test_a_single_upload_is_create_only_on_the_wire(store, wire, tmp_path) -> None:
    store.put_file(write(tmp_path, "a", b"x" * 1000), "m/k.pt")
    (upload,) = wire.uploads()
    assert upload.query["ifGenerationMatch"] == ["0"]
    store.put_file(write(tmp_path, "b", b"y" * 1000), "m/k.pt", if_absent=False)
    assert "ifGenerationMatch" not in wire.uploads()[-1].query


def test_a_composite_upload_is_create_only_where_it_matters(store, wire, tmp_path) -> None:
    """Parts go to random temporary names with no precondition (a retry after a lost reply
    rewrites them); the one compose that names the key is create-only.

    Neither emulator enforces a precondition on compose, so this is the proof that real
    GCS is asked to: the request carries ``ifGenerationMatch=0``.
    """
    source, data = payload(tmp_path, "big.pt", 4 * 4 * MiB + 99)
    digest = store.put_file(source, "m/big.pt")
    assert digest == digest_of(data)
    parts = wire.uploads()
    assert len(parts) == 5
    assert all("ifGenerationMatch" not in p.query for p in parts)
    (compose,) = wire.composes()
    assert compose.path.endswith("/o/m/big.pt/compose")
    assert compose.query["ifGenerationMatch"] == ["0"]
    assert store.content_digest("m/big.pt") == digest
    assert [o.key for o in store.list()] == ["m/big.pt"]
    assert not list(store._client.list_blobs(store._bucket, prefix=TEMP_ROOT))


def test_a_forced_composite_upload_replaces(store, wire, tmp_path) -> None:
    store.put_file(write(tmp_path, "a", b"old"), "m/big.pt")
    source, data = payload(tmp_path, "big.pt", 7 * MiB)
    store.put_file(source, "m/big.pt", if_absent=False)
    (compose,) = wire.composes()
    assert "ifGenerationMatch" not in compose.query
    assert store.content_digest("m/big.pt") == digest_of(data)


def test_losing_the_compose_race_is_object_exists(store, wire, tmp_path) -> None:
    """GCS answers 412 to the loser's compose: it learns its digest and leaves nothing."""
    wire.answer_once(lambda sent: sent.path.endswith("/compose"), 412)
    source, data = payload(tmp_path, "big.pt", 9 * MiB)
    with pytest.raises(ObjectExistsError) as caught:
        store.put_file(source, "m/big.pt")
    assert caught.value.digest == digest_of(data)
    assert list(store._client.list_blobs(store._bucket)) == []


def test_a_part_upload_whose_reply_is_lost_is_retried(store, wire, tmp_path) -> None:
    """The server stored the part but the reply never came: the retry must not get a 412.

    fake-gcs-server enforces ``ifGenerationMatch`` on single-request uploads, so a part
    written create-only would fail here on its retry.
    """
    wire.lose_reply_once(lambda sent: "/upload/" in sent.path)
    source, data = payload(tmp_path, "big.pt", 3 * 4 * MiB + 7)
    digest = store.put_file(source, "m/big.pt")
    assert digest == digest_of(data)
    assert len(wire.uploads()) == 4 + 1  # four parts, one of them sent twice
    target = tmp_path / "out" / "big.pt"
    store.get_file("m/big.pt", target, digest)
    assert target.read_bytes() == data
    assert [o.key for o in store.list()] == ["m/big.pt"]
    assert not list(store._client.list_blobs(store._bucket, prefix=TEMP_ROOT))


@pytest.fixture
def many_parts_store(gcs_bucket: str) -> GCSStore:
    """Parts of 256 KiB, so that 41 of them need an intermediate compose level."""
    return small_parts_store(gcs_bucket, part_size=256 * 1024, parallel_threshold=1 * MiB)


def test_a_multi_level_compose_for_many_parts(many_parts_store, tmp_path, monkeypatch) -> None:
    store = many_parts_store
    wire = Wire(store, monkeypatch)
    source, data = payload(tmp_path, "many.bin", 40 * 256 * 1024 + 5)  # 41 parts
    digest = store.put_file(source, "m/many.bin")
    assert digest == digest_of(data) == store.content_digest("m/many.bin")
    assert [o.key for o in store.list()] == ["m/many.bin"]
    *intermediate, final = wire.composes()
    assert len(intermediate) == 2
    assert all(f"/o/{TEMP_ROOT}/" in c.path for c in intermediate)
    assert all("ifGenerationMatch" not in c.query for c in intermediate)
    assert final.path.endswith("/o/m/many.bin/compose")
    assert final.query["ifGenerationMatch"] == ["0"]


def test_an_intermediate_compose_whose_reply_is_lost_is_retried(
    many_parts_store, tmp_path, monkeypatch
) -> None:
    """Real GCS would answer a create-only retry of a compose that went through with 412;
    the emulators don't check compose preconditions, so the wire plays GCS's part. The
    put must succeed, not report that the caller's key already exists."""
    store = many_parts_store
    wire = Wire(store, monkeypatch)
    attempts = itertools.count(1)

    def intermediate(sent: Sent) -> bool:
        return sent.path.endswith("/c0-00000/compose")

    def retried_create_only(sent: Sent) -> bool:
        return intermediate(sent) and next(attempts) > 1 and "ifGenerationMatch" in sent.query

    wire.answer_once(retried_create_only, 412)
    wire.lose_reply_once(intermediate)
    source, data = payload(tmp_path, "many.bin", 40 * 256 * 1024 + 5)
    digest = store.put_file(source, "m/many.bin")
    assert digest == digest_of(data) == store.content_digest("m/many.bin")
    assert len([c for c in wire.composes() if intermediate(c)]) == 2
    assert [o.key for o in store.list()] == ["m/many.bin"]
    assert not list(store._client.list_blobs(store._bucket, prefix=TEMP_ROOT))


# lost replies on the final write --------------------------------------------------------


def test_a_lost_reply_on_a_single_upload_is_still_our_upload(store, wire, tmp_path) -> None:
    """fake-gcs-server enforces ifGenerationMatch, so the SDK's retry gets a 412; the
    object carries this upload's token, so the put succeeds instead of a conflict."""
    wire.lose_reply_once(lambda sent: "/upload/" in sent.path)
    source, data = payload(tmp_path, "w.pt", 100_000)
    digest = store.put_file(source, "m/k.pt")
    assert digest == digest_of(data) == store.content_digest("m/k.pt")
    assert len(wire.uploads()) == 2


def test_a_lost_reply_on_the_final_compose_is_still_our_upload(store, wire, tmp_path) -> None:
    """Real GCS answers a create-only compose retried after it went through with 412; the
    emulators don't check compose preconditions, so the wire plays GCS's part."""
    final = lambda sent: sent.path.endswith("/o/m/big.pt/compose")  # noqa: E731
    attempts = itertools.count(1)
    wire.answer_once(lambda sent: final(sent) and next(attempts) > 1, 412)
    wire.lose_reply_once(final)
    source, data = payload(tmp_path, "big.pt", 9 * MiB)
    digest = store.put_file(source, "m/big.pt")
    assert digest == digest_of(data) == store.content_digest("m/big.pt")
    assert len(wire.composes()) == 2
    assert [o.key for o in store.list()] == ["m/big.pt"]
    assert not list(store._client.list_blobs(store._bucket, prefix=TEMP_ROOT))


def test_another_writer_s_object_is_still_a_conflict(store, wire, tmp_path) -> None:
    """The token tells them apart. (The compose's 412 comes from the wire: the emulator
    would let a compose replace the object.)"""
    theirs = store._bucket.blob("m/k.pt")
    theirs.metadata = {"nexus-upload": "someone-else"}
    theirs.upload_from_string(b"theirs")
    wire.answer_once(lambda sent: sent.path.endswith("/o/m/k.pt/compose"), 412)
    for size in (1000, 7 * MiB):
        source, data = payload(tmp_path, "w.pt", size)
        with pytest.raises(ObjectExistsError) as caught:
            store.put_file(source, "m/k.pt")
        assert caught.value.digest == digest_of(data)
    assert store.content_digest("m/k.pt") == digest_of(b"theirs")


# failures -------------------------------------------------------------------------------


def test_a_failed_composite_upload_leaves_nothing(store, wire, tmp_path) -> None:
    uploads = itertools.count(1)
    wire.answer_once(lambda sent: "/upload/" in sent.path and next(uploads) == 3, 403)
    source, _ = payload(tmp_path, "big.pt", 5 * 4 * MiB)
    with pytest.raises(StorageError, match="access denied"):
        store.put_file(source, "m/big.pt")
    assert list(store._client.list_blobs(store._bucket)) == []


def test_transient_errors_are_retried(store, wire, tmp_path) -> None:
    wire.answer_once(lambda sent: "/upload/" in sent.path, 503)
    store.put_file(write(tmp_path, "a", b"x" * 100), "m/k.pt")
    assert len(wire.uploads()) == 2


def test_a_denied_request_is_not_retried(store, wire, tmp_path) -> None:
    wire.answer_once(lambda sent: "/upload/" in sent.path, 403)
    with pytest.raises(StorageError, match="storage.objects.create"):
        store.put_file(write(tmp_path, "a", b"x" * 100), "m/k.pt")
    assert len(wire.uploads()) == 1


def test_an_unreachable_endpoint_fails_fast(
    dead_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", dead_endpoint)
    store = GCSStore("some-bucket")
    started = time.monotonic()
    with pytest.raises(StorageError, match=f"cannot reach the GCS emulator at {dead_endpoint}"):
        store.stat("m/k.pt")
    assert time.monotonic() - started < 5


def test_a_missing_bucket_is_a_storage_error_everywhere(
    fake_gcs_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", fake_gcs_endpoint)
    store = GCSStore("no-such-bucket")
    assert_missing_bucket_everywhere(store, tmp_path, "no-such-bucket")


def refused_connection() -> requests.ConnectionError:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    try:
        requests.get(f"http://127.0.0.1:{port}/", timeout=5)
    except requests.ConnectionError as exc:
        return exc
    raise AssertionError("something answered")


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (api_errors.ServiceUnavailable("busy"), True),
        (api_errors.TooManyRequests("slow down"), True),
        (requests.ConnectionError("connection reset by peer"), True),
        (requests.ReadTimeout("read timed out"), True),
        (api_errors.Forbidden("no"), False),
        (api_errors.NotFound("no"), False),
        (api_errors.PreconditionFailed("taken"), False),
        (refused_connection(), False),
    ],
)
def test_which_errors_are_transient(error: Exception, transient: bool) -> None:
    assert is_transient(error) is transient


# downloads ------------------------------------------------------------------------------


def test_large_downloads_come_in_parallel_ranges_of_one_generation(store, wire, tmp_path) -> None:
    source, data = payload(tmp_path, "big.pt", 3 * 4 * MiB + 1)
    digest = store.put_file(source, "m/big.pt")
    wire.sent.clear()
    target = tmp_path / "out" / "big.pt"
    store.get_file("m/big.pt", target, digest)
    assert target.read_bytes() == data
    reads = [s for s in wire.sent if s.query.get("alt") == ["media"]]
    assert sorted(s.headers["range"] for s in reads) == sorted(
        f"bytes={s}-{e - 1}" for s, e in byte_ranges(len(data), 4 * MiB)
    )
    assert len({s.query["generation"][0] for s in reads}) == 1


def test_each_range_is_fetched_through_its_own_blob(store, tmp_path, monkeypatch) -> None:
    """``download_as_bytes`` rewrites its Blob's properties from each response, so worker
    threads must not share one."""
    source, data = payload(tmp_path, "big.pt", 3 * 4 * MiB + 1)
    digest = store.put_file(source, "m/big.pt")
    used: list[storage.Blob] = []  # kept alive, so that no id is reused
    real = storage.Blob.download_as_bytes

    def recording(self: storage.Blob, *args: Any, **kwargs: Any) -> bytes:
        used.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(storage.Blob, "download_as_bytes", recording)
    target = tmp_path / "out" / "big.pt"
    store.get_file("m/big.pt", target, digest)
    assert target.read_bytes() == data
    assert len(used) == len(list(byte_ranges(len(data), 4 * MiB)))
    assert len({id(blob) for blob in used}) == len(used)
    assert len({blob.generation for blob in used}) == 1


def test_an_object_replaced_mid_download_is_an_integrity_error(
    store, tmp_path, monkeypatch
) -> None:
    source, _ = payload(tmp_path, "big.pt", 3 * 4 * MiB)
    digest = store.put_file(source, "m/big.pt")
    replaced = []
    real_get_blob = store._get_blob

    def get_then_replace(key: str):
        blob = real_get_blob(key)
        if not replaced:
            store.put_file(write(tmp_path, "b", b"other"), key, if_absent=False)
            replaced.append(key)
        return blob

    monkeypatch.setattr(store, "_get_blob", get_then_replace)
    downloads = tmp_path / "downloads"
    with pytest.raises(IntegrityError, match="changed while it was being read"):
        store.get_file("m/big.pt", downloads / "big.pt", digest)
    assert list(downloads.iterdir()) == []


def test_prefix_and_from_config(gcs_bucket: str, tmp_path: Path) -> None:
    config = StorageConfig(provider="gcs", bucket=gcs_bucket, prefix="team/models")
    store = open_store(config, tmp_path)
    assert isinstance(store, GCSStore)
    assert store.describe() == f"gs://{gcs_bucket}/team/models"
    store.put_file(write(tmp_path, "a", b"abc"), "m/k.pt")
    raw = [b.name for b in store._client.list_blobs(gcs_bucket)]
    assert raw == ["team/models/m/k.pt"]
    assert [(o.key, o.size, o.sha256) for o in store.list("m/")] == [("m/k.pt", 3, None)]


def test_a_retry_is_announced(store, wire, tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    """Each retry leaves one line for the terminal (``nexus_cli.storage.notices``)."""
    wire.answer_once(lambda sent: "/upload/" in sent.path, 503)
    with caplog.at_level("WARNING", logger="nexus_cli.storage"):
        store.put_file(write(tmp_path, "a", b"x" * 100), "m/k.pt")
    (line,) = [r.getMessage() for r in caplog.records if r.name == "nexus_cli.storage"]
    assert "GCS answered 503" in line
    assert "retrying" in line


def test_an_endpoint_that_never_answers_says_so(
    silent_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bounded read timeouts and retries (shortened here: the defaults take ~45 s), and a
    message that says the endpoint accepted the connection but did not answer."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", silent_endpoint)
    monkeypatch.setattr(gcs, "TIMEOUT", (1, 1))
    monkeypatch.setattr(gcs, "RETRY", gcs.RETRY.with_timeout(2.0))
    store = GCSStore("some-bucket")
    started = time.monotonic()
    with pytest.raises(StorageError, match="accepted the connection but did not answer"):
        store.stat("m/k.pt")
    assert time.monotonic() - started < 20
