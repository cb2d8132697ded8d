"""Amazon S3 and S3-compatible stores (MinIO: the same code with an ``endpoint_url``).

Writes are create-only where asked (``If-None-Match: *`` on the single PUT or on the
multipart completion), so of several writers of one key exactly one wins and the others
learn it from a 412. Small files go up in one PUT carrying their SHA-256, which S3
checks and keeps: ``stat`` can then report a SHA-256 the store computed, and ``verify``
trusts it instead of downloading. Large files go up as a multipart upload whose parts are
read from the file once, in order, hashed on the way and sent on a bounded thread pool;
any failure, or Ctrl-C, aborts the upload so no parts linger. Large downloads fetch
ranges in parallel, pinned to the ETag seen first, and are hashed in order.

Credentials come only from boto3's standard chain (environment, profiles, roles).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import math
import os
import re
import time
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    CredentialRetrievalError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
    ReadTimeoutError,
    ResponseStreamingError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from nexus_cli.config import StorageConfig
from nexus_cli.errors import (
    IntegrityError,
    NexusError,
    NotFoundError,
    StorageError,
)
from nexus_cli.storage.base import Leftover, ObjectInfo
from nexus_cli.storage.bucket import BucketStore, MiB, one_line
from nexus_cli.transfer import (
    Digest,
    Progress,
    StreamHasher,
    byte_ranges,
    hashed_parts,
    no_progress,
    ordered_parallel,
    read_hashed,
)

#: files below this go up in one PUT (held in memory, at most this big), larger ones in parts
DEFAULT_MULTIPART_THRESHOLD = 64 * MiB
#: part size for uploads and range size for downloads; S3 wants at least 5 MiB per part
DEFAULT_PART_SIZE = 16 * MiB
#: parts in flight at once; memory stays near (concurrency + 1) * part size
DEFAULT_MAX_CONCURRENCY = 8
MIN_PART_SIZE = 5 * MiB
MAX_PARTS = 10_000

# A multipart object's ETag ends in "-<parts>"; its checksums are checksums of checksums.
_MULTIPART_ETAG = re.compile(r"-\d+\"?$")
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
}
_REGION_CODES = {"PermanentRedirect", "AuthorizationHeaderMalformed"}
_DENIED_CODES = {"AccessDenied", "AllAccessDisabled", "AccountProblem", "403", "Forbidden"}
_STREAM_ERRORS = (
    ResponseStreamingError,
    ReadTimeoutError,
    ConnectionClosedError,
    IncompleteReadError,
)
# what each action needs in an IAM policy, for the "access denied" hint
_PERMISSIONS = {
    "read": "s3:GetObject",
    "check": "s3:GetObject (and s3:ListBucket, without which a missing key is a 403)",
    "write": "s3:PutObject and s3:AbortMultipartUpload",
    "list": "s3:ListBucket",
    "delete": "s3:DeleteObject",
    "list uploads in": "s3:ListBucketMultipartUploads",
    "abort an upload to": "s3:AbortMultipartUpload",
}
_CREDENTIALS_HINT = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), or AWS_PROFILE, "
    "or run with an IAM role"
)


def _error_code(exc: ClientError) -> tuple[str, int]:
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return str(error.get("Code", status)), int(status or 0)


def _store_sha256(head: dict[str, Any]) -> str | None:
    """The object's SHA-256 when S3 holds one for the whole object, else ``None``.

    A multipart object's SHA-256 (``...-N``, or ``ChecksumType: COMPOSITE``; moto drops
    both markers, hence the ETag check) is a hash of part hashes, not of the bytes.
    """
    value = head.get("ChecksumSHA256")
    if not value or "-" in value or head.get("ChecksumType", "FULL_OBJECT") != "FULL_OBJECT":
        return None
    if _MULTIPART_ETAG.search(head.get("ETag", "")):
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except binascii.Error:
        return None
    return raw.hex() if len(raw) == 32 else None


def make_client(endpoint_url: str | None, region: str | None, pool_size: int) -> Any:
    """A boto3 S3 client: standard retries with backoff, path-style for custom endpoints.

    ``AWS_MAX_ATTEMPTS`` and ``AWS_RETRY_MODE`` still win where a user set them.
    """
    retries: dict[str, Any] = {"mode": os.environ.get("AWS_RETRY_MODE") or "standard"}
    if not os.environ.get("AWS_MAX_ATTEMPTS"):
        retries["max_attempts"] = 5
    config = Config(
        retries=retries,
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=pool_size,
        s3={"addressing_style": "path"} if endpoint_url else {},
        user_agent_extra="nexusml",
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url, region_name=region, config=config
    )


class S3Store(BucketStore):
    """Objects in an S3 bucket under an optional key prefix."""

    provider = "s3"
    scheme = "s3"

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        provider: str = "s3",
        client: Any = None,
        part_size: int = DEFAULT_PART_SIZE,
        multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes (S3's minimum)")
        super().__init__(bucket, prefix)
        self.endpoint_url = endpoint_url or None
        self.region = region or None
        self.provider = provider
        self.part_size = part_size
        self.multipart_threshold = max(multipart_threshold, 1)
        self.max_concurrency = max(max_concurrency, 1)
        self._bucket_checked = False
        if client is None:
            try:
                client = make_client(self.endpoint_url, self.region, self.max_concurrency + 2)
            except ProfileNotFound as exc:
                raise StorageError(
                    f"AWS profile {exc.kwargs.get('profile')!r} is not configured",
                    hint="fix AWS_PROFILE or add the profile to ~/.aws/config",
                ) from exc
            except BotoCoreError as exc:
                raise StorageError(f"cannot set up the S3 client: {one_line(exc)}") from exc
        self._client = client

    @classmethod
    def from_config(cls, config: StorageConfig, base_dir: Path) -> S3Store:
        return cls(
            config.bucket,
            prefix=config.prefix,
            endpoint_url=config.endpoint_url or None,
            region=config.region or None,
            provider=config.provider,
        )

    def describe(self) -> str:
        return f"{self._uri()} at {self.endpoint_url}" if self.endpoint_url else self._uri()

    # keys and errors ----------------------------------------------------------------

    def _endpoint(self) -> str:
        if self.endpoint_url:
            return f"the endpoint {self.endpoint_url}"
        return f"S3 in {self.region or self._client.meta.region_name or 'the default region'}"

    def _error(self, exc: Exception, action: str, key: str | None) -> NexusError:
        """One line that names the bucket or endpoint and what to check."""
        where = self._uri(key)
        if isinstance(exc, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
            return StorageError(
                f"no usable AWS credentials to {action} {where}: {one_line(exc)}",
                hint=_CREDENTIALS_HINT,
            )
        if isinstance(exc, BotoConnectionError | ConnectionClosedError | ReadTimeoutError):
            return StorageError(
                f"cannot reach {self._endpoint()} to {action} {where}",
                hint="check storage.endpoint_url or NEXUS_ENDPOINT_URL, the network and proxy, "
                "and that the server is up",
            )
        if not isinstance(exc, ClientError):
            return StorageError(f"S3 failed to {action} {where}: {one_line(exc)}")
        code, status = _error_code(exc)
        message = one_line(exc.response.get("Error", {}).get("Message", ""))
        if code == "NoSuchBucket":
            return self._missing_bucket()
        if code == "NoSuchUpload":
            return StorageError(
                f"the store dropped the multipart upload to {where} before it completed",
                hint="a lifecycle rule may abort slow uploads: run the command again",
            )
        if code == "NoSuchKey" or (status == 404 and key):
            return NotFoundError(f"object {key} is missing from {self.describe()}")
        if code in _CREDENTIAL_CODES:
            return StorageError(
                f"{self._endpoint()} rejected the AWS credentials ({code}) for {where}",
                hint="check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN or "
                "AWS_PROFILE: the key is unknown, the secret wrong or the token expired",
            )
        if code in _REGION_CODES or status == 301:
            return StorageError(
                f"bucket {self.bucket_name!r} is not in the region the request went to ({code})",
                hint="set storage.region or NEXUS_REGION to the bucket's region",
            )
        if code in _DENIED_CODES or status == 403:
            return StorageError(
                f"access denied: cannot {action} {where} ({code})",
                hint=f"the credentials' policy must allow {_PERMISSIONS.get(action, action)} "
                f"on arn:aws:s3:::{self.bucket_name}",
            )
        if status >= 500 or code in {"SlowDown", "Throttling", "RequestTimeout"}:
            return StorageError(
                f"{self._endpoint()} kept failing to {action} {where} after retries ({code})",
                hint="the service is throttling or unavailable: try again later",
            )
        return StorageError(f"S3 refused to {action} {where}: {code} {message}".rstrip())

    def _missing_bucket(self) -> StorageError:
        return StorageError(
            f"bucket {self.bucket_name!r} does not exist at {self._endpoint()}",
            hint="create it, or fix storage.bucket / NEXUS_BUCKET (and storage.region)",
        )

    @contextlib.contextmanager
    def _translated(self, action: str, key: str | None = None) -> Iterator[None]:
        try:
            yield
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, action, key) from exc

    def _check_bucket(self) -> None:
        """Tell a missing bucket from a missing key after an ambiguous 404 (HEAD has no body)."""
        if self._bucket_checked:
            return
        try:
            self._client.head_bucket(Bucket=self.bucket_name)
        except ClientError as exc:
            code, status = _error_code(exc)
            if status == 404 or code == "NoSuchBucket":
                raise self._missing_bucket() from exc
            if status != 403:  # 403: allowed to read objects but not to list; that's fine
                raise self._error(exc, "check", None) from exc
        self._bucket_checked = True

    def _head(self, key: str) -> dict[str, Any] | None:
        name = self._name(key)
        try:
            return self._client.head_object(
                Bucket=self.bucket_name, Key=name, ChecksumMode="ENABLED"
            )
        except ClientError as exc:
            status = _error_code(exc)[1]
            if status == 404:
                self._check_bucket()
                return None
            if status == 403:
                self._explain_forbidden(name, key, exc)
            raise self._error(exc, "check", key) from exc

    def _explain_forbidden(self, name: str, key: str, exc: ClientError) -> None:
        """A HEAD 403 has no body; a one-byte GET tells bad credentials from a denial."""
        try:
            answer = self._client.get_object(Bucket=self.bucket_name, Key=name, Range="bytes=0-0")
            answer["Body"].close()
        except ClientError as probe:
            if _error_code(probe)[1] in (401, 403):
                raise self._error(probe, "check", key) from exc
        except BotoCoreError:
            pass

    # the interface --------------------------------------------------------------------

    def stat(self, key: str) -> ObjectInfo | None:
        with self._translated("check", key):
            head = self._head(key)
        if head is None:
            return None
        return ObjectInfo(key=key, size=head["ContentLength"], sha256=_store_sha256(head))

    def put_file(
        self, source: Path, key: str, *, if_absent: bool = True, progress: Progress = no_progress
    ) -> Digest:
        name = self._name(key)
        try:
            size = source.stat().st_size
        except FileNotFoundError as exc:
            raise NotFoundError(f"no such file: {source}") from exc
        with self._translated("write", key):
            if size < self.multipart_threshold:
                return self._put_single(source, name, key, if_absent, progress)
            return self._put_multipart(source, name, key, size, if_absent, progress)

    def _put_single(
        self, source: Path, name: str, key: str, if_absent: bool, progress: Progress
    ) -> Digest:
        """One PUT with the SHA-256 computed while the file was read; S3 checks and keeps it."""
        body, digest = read_hashed(source)
        checksum = base64.b64encode(bytes.fromhex(digest.sha256)).decode()
        condition = {"IfNoneMatch": "*"} if if_absent else {}
        for attempt in range(4):
            try:
                self._client.put_object(
                    Bucket=self.bucket_name,
                    Key=name,
                    Body=body,
                    ChecksumAlgorithm="SHA256",
                    ChecksumSHA256=checksum,
                    **condition,
                )
                break
            except ClientError as exc:
                status = _error_code(exc)[1]
                # 409: a concurrent conditional write to this key was in flight; if it has
                # landed, it won, else try again
                if status == 412 or (status == 409 and if_absent and self._head(key)):
                    raise self._exists_error(key, digest) from exc
                if status != 409 or attempt == 3:
                    raise
                time.sleep(0.2 * 2**attempt)
        progress(digest.size)
        return digest

    def _put_multipart(
        self, source: Path, name: str, key: str, size: int, if_absent: bool, progress: Progress
    ) -> Digest:
        """Parts read once in order, hashed as read, sent in parallel; aborted on any failure."""
        part_size = max(self.part_size, math.ceil(size / MAX_PARTS))
        upload_id = self._client.create_multipart_upload(
            Bucket=self.bucket_name, Key=name, ChecksumAlgorithm="CRC32"
        )["UploadId"]

        def send(part: tuple[int, bytes]) -> tuple[int, dict[str, Any]]:
            number, chunk = part
            answer = self._client.upload_part(
                Bucket=self.bucket_name,
                Key=name,
                UploadId=upload_id,
                PartNumber=number,
                Body=chunk,
                ChecksumAlgorithm="CRC32",
            )
            done = {"PartNumber": number, "ETag": answer["ETag"]}
            if answer.get("ChecksumCRC32"):
                done["ChecksumCRC32"] = answer["ChecksumCRC32"]
            return len(chunk), done

        hasher = StreamHasher()
        try:
            parts = []
            with closing(
                ordered_parallel(
                    send, hashed_parts(source, part_size, hasher), self.max_concurrency
                )
            ) as sent:
                for count, done in sent:
                    parts.append(done)
                    progress(count)
            digest = hasher.digest()
            condition = {"IfNoneMatch": "*"} if if_absent else {}
            try:
                self._client.complete_multipart_upload(
                    Bucket=self.bucket_name,
                    Key=name,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                    **condition,
                )
            except ClientError as exc:
                status = _error_code(exc)[1]
                # 409: another completion raced ours; whoever holds the key now has won
                if status == 412 or (status == 409 and if_absent and self._head(key)):
                    raise self._exists_error(key, digest) from exc
                raise
            return digest
        except BaseException:
            self._abort(name, upload_id)
            raise
        finally:
            hasher.close()

    def _abort(self, name: str, upload_id: str) -> None:
        """Best effort: a failed abort leaves parts for the bucket's lifecycle rule."""
        with contextlib.suppress(ClientError, BotoCoreError):
            self._client.abort_multipart_upload(
                Bucket=self.bucket_name, Key=name, UploadId=upload_id
            )

    def _fetch_range(self, name: str, etag: str, span: tuple[int, int]) -> bytes:
        """One range of the object as it was when first seen (``If-Match``), read in full.

        botocore retries failed requests; a body that breaks off mid-read is retried here.
        """
        start, end = span
        for attempt in range(3):
            answer = self._client.get_object(
                Bucket=self.bucket_name, Key=name, Range=f"bytes={start}-{end - 1}", IfMatch=etag
            )
            try:
                with closing(answer["Body"]) as body:
                    data = body.read()
                break
            except _STREAM_ERRORS:
                if attempt == 2:
                    raise
                time.sleep(0.2 * 2**attempt)
        if len(data) != end - start:
            raise IntegrityError(f"{name}: range {start}-{end} gave {len(data)} bytes")
        return data

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        """The bytes of one version (its ETag) in order; large objects in parallel ranges."""
        with self._translated("read", key):
            head = self._head(key)
            if head is None:
                raise NotFoundError(f"object {key} is missing from {self.describe()}")
            name, etag = self._name(key), head["ETag"]
            ranges = byte_ranges(head["ContentLength"], self.part_size)
            fetch = lambda span: self._fetch_range(name, etag, span)  # noqa: E731
            try:
                with closing(ordered_parallel(fetch, ranges, self.max_concurrency)) as chunks:
                    yield from chunks
            except ClientError as exc:
                if _error_code(exc)[1] != 412:
                    raise
                raise IntegrityError(
                    f"object {key} in {self.describe()} changed while it was being read"
                ) from exc

    def delete(self, key: str) -> None:
        name = self._name(key)
        with self._translated("delete", key):
            self._client.delete_object(Bucket=self.bucket_name, Key=name)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        with self._translated("list"):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket_name, Prefix=self._root + prefix
            )
            for page in pages:
                for item in page.get("Contents", []):
                    yield ObjectInfo(key=self._key(item["Key"]), size=item["Size"])

    def leftovers(self, older_than: timedelta) -> Iterator[Leftover]:
        """Multipart uploads under the prefix that were started before the cutoff and
        never completed or aborted (a killed `nexus store`): S3 keeps and bills their parts."""
        cutoff = datetime.now(UTC) - older_than
        with self._translated("list uploads in"):
            pages = self._client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket_name, Prefix=self._root
            )
            for page in pages:
                for upload in page.get("Uploads", []):
                    started = upload["Initiated"].astimezone(UTC)
                    if started < cutoff:
                        yield Leftover(
                            "multipart_upload",
                            self._key(upload["Key"]),
                            self._uploaded_bytes(upload["Key"], upload["UploadId"]),
                            started,
                            upload["UploadId"],
                        )

    def _uploaded_bytes(self, name: str, upload_id: str) -> int | None:
        """What the upload's parts hold, or ``None`` when the store will not say."""
        try:
            pages = self._client.get_paginator("list_parts").paginate(
                Bucket=self.bucket_name, Key=name, UploadId=upload_id
            )
            return sum(part["Size"] for page in pages for part in page.get("Parts", []))
        except (ClientError, BotoCoreError):
            return None

    def remove_leftover(self, leftover: Leftover) -> None:
        if leftover.kind != "multipart_upload" or not leftover.upload_id:
            raise ValueError(f"{leftover.name} is not a multipart upload")
        with self._translated("abort an upload to", leftover.name):
            try:
                self._client.abort_multipart_upload(
                    Bucket=self.bucket_name,
                    Key=self._root + leftover.name,
                    UploadId=leftover.upload_id,
                )
            except ClientError as exc:
                if _error_code(exc)[0] != "NoSuchUpload":  # gone already: done
                    raise
