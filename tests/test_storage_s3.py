"""The S3 backend against moto's server on 127.0.0.1: the storage contract, then S3's own cases."""

from __future__ import annotations

import base64
import hashlib
import os
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import urllib3
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError, ConnectionClosedError

from nexus_cli.config import StorageConfig
from nexus_cli.errors import IntegrityError, ObjectExistsError, StorageError
from nexus_cli.storage import open_store
from nexus_cli.storage.s3 import S3Store, _store_sha256
from nexus_cli.transfer import Digest, byte_ranges
from tests.storage_contract import (
    StorageContract,
    assert_missing_bucket_everywhere,
    digest_of,
    write,
)

pytest_plugins = ["tests.cloud_servers"]

MiB = 1024 * 1024
SHA_HEX = hashlib.sha256(b"abc").hexdigest()
SHA_B64 = base64.b64encode(bytes.fromhex(SHA_HEX)).decode()


def small_parts_store(bucket: str, endpoint: str, **kwargs: Any) -> S3Store:
    """A store whose multipart path starts at 6 MiB (5 MiB parts, S3's minimum)."""
    options = {"part_size": 5 * MiB, "multipart_threshold": 6 * MiB, "max_concurrency": 4}
    return S3Store(bucket, endpoint_url=endpoint, **{**options, **kwargs})


class TestS3Contract(StorageContract):
    @pytest.fixture
    def store(self, s3_bucket: str, moto_endpoint: str) -> S3Store:
        return small_parts_store(s3_bucket, moto_endpoint)

    def leave_leftover(self, store: S3Store, tmp_path: Path) -> str:
        """A multipart upload with one part sent, never completed: a killed `nexus store`
        (of a key nexus writes: gc leaves other applications' uploads alone)."""
        leave_multipart_upload(store._client, store.bucket_name, VERSION_KEY)
        return VERSION_KEY


#: a key of the shape nexus stores a version at
VERSION_KEY = f"m/{'c' * 40}.pt"


def leave_multipart_upload(client: Any, bucket: str, key: str) -> str:
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=b"p" * 100)
    return upload_id


def payload(tmp_path: Path, name: str, size: int) -> tuple[Path, bytes]:
    data = os.urandom(size)
    return write(tmp_path, name, data), data


def count_requests(store: S3Store, operation: str) -> list[dict]:
    """Record the headers of every ``operation`` request the store's client sends."""
    seen: list[dict] = []
    store._client.meta.events.register(
        f"before-send.s3.{operation}", lambda request, **_: seen.append(dict(request.headers))
    )
    return seen


@pytest.fixture
def store(s3_bucket: str, moto_endpoint: str) -> S3Store:
    return small_parts_store(s3_bucket, moto_endpoint)


# checksums the store computed -----------------------------------------------------------


def test_a_single_put_leaves_a_sha256_that_verify_can_trust(store: S3Store, tmp_path) -> None:
    source, data = payload(tmp_path, "small.pt", 100_000)
    digest = store.put_file(source, "m/small.pt")
    assert store.stat("m/small.pt").sha256 == digest.sha256 == digest_of(data).sha256
    reads = count_requests(store, "GetObject")
    assert store.content_digest("m/small.pt") == digest
    assert reads == []  # no download


def test_a_multipart_object_is_verified_by_its_bytes(store: S3Store, tmp_path) -> None:
    source, data = payload(tmp_path, "big.pt", 11 * MiB)
    digest = store.put_file(source, "m/big.pt")
    assert store.stat("m/big.pt").sha256 is None
    reads = count_requests(store, "GetObject")
    assert store.content_digest("m/big.pt") == digest == digest_of(data)
    assert len(reads) == 3  # three 5 MiB ranges


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        ({"ChecksumSHA256": SHA_B64, "ETag": '"abc"'}, SHA_HEX),
        ({"ChecksumSHA256": SHA_B64, "ETag": '"abc"', "ChecksumType": "FULL_OBJECT"}, SHA_HEX),
        ({"ChecksumSHA256": SHA_B64 + "-3", "ETag": '"abc-3"'}, None),
        ({"ChecksumSHA256": SHA_B64, "ETag": '"abc"', "ChecksumType": "COMPOSITE"}, None),
        ({"ChecksumSHA256": SHA_B64, "ETag": '"abc-2"'}, None),  # moto drops the "-N" suffix
        ({"ChecksumCRC32": "AAAAAA==", "ETag": '"abc"'}, None),
    ],
)
def test_only_a_full_object_sha256_counts(head: dict, expected: str | None) -> None:
    assert _store_sha256(head) == expected


# multipart uploads ----------------------------------------------------------------------


def test_parts_go_up_in_parallel_and_the_file_is_read_once(
    store: S3Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, data = payload(tmp_path, "big.pt", 16 * MiB + 7)
    opened = []
    real_open = open

    def counting_open(path, *args, **kwargs):
        if Path(path) == source:
            opened.append(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", counting_open)
    parts = count_requests(store, "UploadPart")
    progressed: list[int] = []
    digest = store.put_file(source, "m/big.pt", progress=progressed.append)
    assert digest == digest_of(data)
    assert len(opened) == 1  # read once: hashed on the way to the parts
    assert len(parts) == 4
    assert sum(progressed) == len(data)
    assert all(headers.get("x-amz-checksum-crc32") for headers in parts)


def _fail_part(store: S3Store, monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    real = store._client.upload_part

    def flaky(**kwargs):
        if kwargs["PartNumber"] == 2:
            raise error
        return real(**kwargs)

    monkeypatch.setattr(store._client, "upload_part", flaky)


SERVER_ERROR = {"Error": {"Code": "InternalError"}, "ResponseMetadata": {"HTTPStatusCode": 500}}


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ClientError(SERVER_ERROR, "UploadPart"), StorageError),
        (KeyboardInterrupt(), KeyboardInterrupt),
    ],
    ids=["server-error", "ctrl-c"],
)
def test_a_failed_or_interrupted_multipart_upload_is_aborted(
    store: S3Store, s3_client, s3_bucket: str, tmp_path, monkeypatch, error, expected
) -> None:
    _fail_part(store, monkeypatch, error)
    source, _ = payload(tmp_path, "big.pt", 16 * MiB)
    with pytest.raises(expected):
        store.put_file(source, "m/big.pt")
    assert store.stat("m/big.pt") is None
    assert not s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")


def test_racing_multipart_writers_have_one_winner(
    s3_bucket: str, moto_endpoint: str, s3_client, tmp_path: Path
) -> None:
    """The loser's 412 comes at completion, after all its parts went up; it is aborted."""
    sources = [payload(tmp_path, f"w{i}", 11 * MiB) for i in range(3)]
    outcomes: list[object] = [None] * 3
    barrier = threading.Barrier(3)

    def put(index: int) -> None:
        store = small_parts_store(s3_bucket, moto_endpoint)
        barrier.wait()
        try:
            outcomes[index] = store.put_file(sources[index][0], "race/big.pt")
        except ObjectExistsError as exc:
            outcomes[index] = exc

    threads = [threading.Thread(target=put, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    winners = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, Digest)]
    assert len(winners) == 1
    for index, outcome in enumerate(outcomes):
        if index not in winners:
            assert isinstance(outcome, ObjectExistsError)
            assert outcome.digest == digest_of(sources[index][1])
    stored = small_parts_store(s3_bucket, moto_endpoint).content_digest("race/big.pt")
    assert stored == digest_of(sources[winners[0]][1])
    assert not s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")


# parallel downloads ---------------------------------------------------------------------


def test_large_downloads_come_in_parallel_ranges_of_one_version(
    store: S3Store, tmp_path: Path
) -> None:
    source, data = payload(tmp_path, "big.pt", 16 * MiB + 3)
    digest = store.put_file(source, "m/big.pt")
    reads = count_requests(store, "GetObject")
    target = tmp_path / "out" / "big.pt"
    store.get_file("m/big.pt", target, digest)
    assert target.read_bytes() == data
    assert sorted(h["Range"] for h in reads) == sorted(
        f"bytes={s}-{e - 1}".encode() for s, e in byte_ranges(len(data), 5 * MiB)
    )
    assert len({h["If-Match"] for h in reads}) == 1


def test_an_object_replaced_mid_download_is_an_integrity_error(
    store: S3Store, s3_client, s3_bucket: str, tmp_path: Path, monkeypatch
) -> None:
    source, data = payload(tmp_path, "big.pt", 16 * MiB)
    digest = store.put_file(source, "m/big.pt")
    real = store._fetch_range

    def replace_after_first(name: str, etag: str, span: tuple[int, int]) -> bytes:
        if span[0] == 0:
            s3_client.put_object(Bucket=s3_bucket, Key=name, Body=b"new" * 1000)
        return real(name, etag, span)

    monkeypatch.setattr(store, "_fetch_range", replace_after_first)
    downloads = tmp_path / "downloads"
    with pytest.raises(IntegrityError, match="changed while it was being read"):
        store.get_file("m/big.pt", downloads / "big.pt", digest)
    assert list(downloads.iterdir()) == []


# configuration, prefixes, retries, errors ----------------------------------------------


def test_from_config_and_prefix(s3_bucket: str, moto_endpoint: str, s3_client, tmp_path) -> None:
    config = StorageConfig(provider="minio", bucket=s3_bucket, prefix="team/models",
                           endpoint_url=moto_endpoint, region="eu-west-1")  # fmt: skip
    store = open_store(config, tmp_path)
    assert isinstance(store, S3Store)
    assert store.provider == "minio"
    assert store._client.meta.config.s3["addressing_style"] == "path"
    assert store._client.meta.region_name == "eu-west-1"
    assert store.describe() == f"s3://{s3_bucket}/team/models at {moto_endpoint}"
    store.put_file(write(tmp_path, "a", b"abc"), "m/k.pt")
    raw = s3_client.list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert [o["Key"] for o in raw] == ["team/models/m/k.pt"]
    assert [o.key for o in store.list("m/")] == ["m/k.pt"]


def test_aws_without_an_endpoint_uses_virtual_hosted_addressing(aws_env) -> None:
    store = S3Store("my-bucket", region="us-west-2")
    assert store._client.meta.config.s3 in (None, {})
    assert store.describe() == "s3://my-bucket"


def _answer_once(store: S3Store, operation: str, status: int, code: str) -> list[int]:
    """Make the first ``operation`` request fail with ``status``; return the attempt count."""
    attempts: list[int] = []

    def fail_first(request, **_):
        attempts.append(1)
        if len(attempts) == 1:
            body = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
            return AWSResponse(request.url, status, {}, _RawBody(body))
        return None

    store._client.meta.events.register(f"before-send.s3.{operation}", fail_first)
    return attempts


class _RawBody:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_):
        yield self._data


def test_throttling_is_retried_with_backoff(store: S3Store, tmp_path: Path) -> None:
    attempts = _answer_once(store, "PutObject", 503, "SlowDown")
    store.put_file(write(tmp_path, "a", b"x" * 1000), "m/k.pt")
    assert len(attempts) == 2


def test_a_denied_request_is_not_retried(store: S3Store, tmp_path: Path) -> None:
    attempts = _answer_once(store, "PutObject", 403, "AccessDenied")
    with pytest.raises(StorageError, match="access denied") as caught:
        store.put_file(write(tmp_path, "a", b"x"), "m/k.pt")
    assert len(attempts) == 1
    assert "s3:PutObject" in str(caught.value)


def test_a_missing_bucket_is_a_storage_error_everywhere(
    moto_endpoint: str, aws_env, tmp_path: Path
) -> None:
    store = S3Store("no-such-bucket", endpoint_url=moto_endpoint)
    assert_missing_bucket_everywhere(store, tmp_path, "no-such-bucket")


def test_a_409_at_completion_is_a_conflict_only_for_a_create_only_write(
    store: S3Store, s3_client, s3_bucket: str, tmp_path: Path
) -> None:
    """409 (a concurrent completion) means "someone else won" only when we asked for
    create-only; a forced write that meets one reports a storage error, not exit 5."""
    first, _ = payload(tmp_path, "first.pt", 7 * MiB)
    store.put_file(first, "m/k.pt")
    second, _ = payload(tmp_path, "second.pt", 7 * MiB)
    _answer_once(store, "CompleteMultipartUpload", 409, "ConditionalRequestConflict")
    with pytest.raises(ObjectExistsError):
        store.put_file(second, "m/k.pt")
    _answer_once(store, "CompleteMultipartUpload", 409, "ConditionalRequestConflict")
    with pytest.raises(StorageError) as caught:
        store.put_file(second, "m/k.pt", if_absent=False)
    assert not isinstance(caught.value, ObjectExistsError)
    assert not s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")


def test_an_upload_dropped_by_the_store_says_so(store: S3Store, tmp_path: Path) -> None:
    source, _ = payload(tmp_path, "big.pt", 7 * MiB)
    _answer_once(store, "CompleteMultipartUpload", 404, "NoSuchUpload")
    with pytest.raises(StorageError, match="dropped the multipart upload"):
        store.put_file(source, "m/k.pt")


# lost replies ---------------------------------------------------------------------------


def lose_reply_once(
    store: S3Store, operation: str, retry_answer: tuple[int, str] | None = None
) -> list[int]:
    """Carry out the first ``operation`` request on the server, then fail it as if the
    connection closed before the reply came, so that botocore sends it again.

    ``retry_answer`` (status, code) answers the retry instead of the server, where moto
    differs from S3 (it completes an already completed upload again, with no 412).
    Returns the list of attempts seen.
    """
    attempts: list[int] = []

    def deliver_then_drop(request, **_):
        attempts.append(1)
        if len(attempts) > 1:
            if retry_answer is None:
                return None
            status, code = retry_answer
            body = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
            return AWSResponse(request.url, status, {}, _RawBody(body))
        body = request.body
        if hasattr(body, "read"):
            body = body.read()
            request.reset_stream()
        answer = urllib3.PoolManager().request(
            request.method, request.url, body=body, headers=dict(request.headers)
        )
        assert answer.status < 300, answer.data
        raise ConnectionClosedError(endpoint_url=request.url)

    store._client.meta.events.register(f"before-send.s3.{operation}", deliver_then_drop)
    return attempts


@pytest.mark.parametrize(
    ("size", "operation", "retry_answer"),
    [
        (100_000, "PutObject", None),  # moto answers the retry with 412, as S3 does
        (11 * MiB, "CompleteMultipartUpload", (412, "PreconditionFailed")),
        (11 * MiB, "CompleteMultipartUpload", (404, "NoSuchUpload")),
    ],
    ids=["single-put", "completion-412", "completion-no-such-upload"],
)
def test_a_lost_reply_on_the_final_write_is_still_our_upload(
    store: S3Store,
    s3_client,
    s3_bucket: str,
    tmp_path: Path,
    size: int,
    operation: str,
    retry_answer: tuple[int, str] | None,
) -> None:
    """The write landed, its reply was lost and botocore retried: the retry meets our own
    object (412, or the upload already completed), which is a success, not a conflict."""
    attempts = lose_reply_once(store, operation, retry_answer)
    source, data = payload(tmp_path, "w.pt", size)
    digest = store.put_file(source, "m/k.pt")
    assert len(attempts) == 2
    assert digest == digest_of(data) == store.content_digest("m/k.pt")
    assert not s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")


def test_another_writer_s_object_is_still_a_conflict(
    store: S3Store, s3_client, s3_bucket: str, tmp_path: Path
) -> None:
    """The token tells them apart: an object another upload wrote is ObjectExistsError."""
    s3_client.put_object(Bucket=s3_bucket, Key="m/k.pt", Body=b"theirs",
                         Metadata={"nexus-upload": "someone-else"})  # fmt: skip
    for size in (1000, 7 * MiB):
        source, data = payload(tmp_path, "w.pt", size)
        with pytest.raises(ObjectExistsError) as caught:
            store.put_file(source, "m/k.pt")
        assert caught.value.digest == digest_of(data)
    assert store.content_digest("m/k.pt") == digest_of(b"theirs")


def test_each_upload_is_tagged_with_a_fresh_token(store: S3Store, s3_client, s3_bucket, tmp_path):
    tokens = []
    for key, size in (("m/a.pt", 1000), ("m/b.pt", 7 * MiB)):
        store.put_file(payload(tmp_path, "w.pt", size)[0], key)
        head = s3_client.head_object(Bucket=s3_bucket, Key=key)
        tokens.append(head["Metadata"]["nexus-upload"])
    assert len(set(tokens)) == 2
    assert all(len(token) == 32 for token in tokens)


# leftovers ------------------------------------------------------------------------------


def test_leftovers_are_the_prefix_s_multipart_uploads(
    s3_bucket: str, moto_endpoint: str, s3_client, tmp_path: Path
) -> None:
    """Only uploads under the store's prefix, each with its id and the bytes its parts hold;
    aborting one leaves the others (and every stored object) alone."""
    store = small_parts_store(s3_bucket, moto_endpoint, prefix="team")
    store.put_file(write(tmp_path, "a", b"stored"), "m/k.pt")
    ours = leave_multipart_upload(s3_client, s3_bucket, f"team/{VERSION_KEY}")
    theirs = leave_multipart_upload(s3_client, s3_bucket, f"other/{VERSION_KEY}")
    (leftover,) = store.leftovers(timedelta(0))
    assert (leftover.kind, leftover.name) == ("multipart_upload", VERSION_KEY)
    assert (leftover.upload_id, leftover.size) == (ours, 100)
    store.remove_leftover(leftover)
    remaining = s3_client.list_multipart_uploads(Bucket=s3_bucket)["Uploads"]
    assert [u["UploadId"] for u in remaining] == [theirs]
    assert [o.key for o in store.list()] == ["m/k.pt"]


def test_listing_leftovers_when_denied_names_the_permission(store: S3Store) -> None:
    _answer_once(store, "ListMultipartUploads", 403, "AccessDenied")
    with pytest.raises(StorageError, match="s3:ListBucketMultipartUploads"):
        list(store.leftovers(timedelta(0)))


def test_parts_reuse_a_bounded_set_of_buffers_and_may_land_in_any_order(
    store: S3Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow first part holds up only itself (the others go on), parts are listed in
    order at completion, and the bytes and digest are right although buffers are reused."""
    source, data = payload(tmp_path, "big.pt", 8 * 5 * MiB + 11)  # nine parts, four workers
    real = store._send_part
    finished: list[int] = []
    first_may_finish = threading.Event()

    def slow_first(upload, number, chunk):
        if number == 1:
            assert first_may_finish.wait(timeout=60)
        answer = real(upload, number, chunk)
        finished.append(number)
        if len(finished) == 5:
            first_may_finish.set()  # five other parts went up while the first was stuck
        return answer

    monkeypatch.setattr(store, "_send_part", slow_first)
    digest = store.put_file(source, "m/big.pt")
    assert digest == digest_of(data) == store.content_digest("m/big.pt")
    assert finished.index(1) >= 5
    assert sorted(finished) == list(range(1, 10))


def test_a_retry_is_announced(store: S3Store, tmp_path: Path, caplog) -> None:
    """Each retry leaves one line for the terminal: the call, the store, why, which try."""
    _answer_once(store, "PutObject", 503, "SlowDown")
    with caplog.at_level("WARNING", logger="nexus_cli.storage"):
        store.put_file(write(tmp_path, "a", b"x" * 1000), "m/k.pt")
    (line,) = [r.getMessage() for r in caplog.records if r.name == "nexus_cli.storage"]
    assert line.startswith(f"PutObject on {store.describe()}: the endpoint answered 503 SlowDown")
    assert line.endswith("retrying (2 of 5)")
