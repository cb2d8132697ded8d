"""Amazon S3 and S3-compatible stores (MinIO: the same code with an ``endpoint_url``).

The shape of every operation is ``BucketStore``'s; this module is the S3 calls.
Writes are create-only where asked (``If-None-Match: *`` on the single PUT or on the
multipart completion), so of several writers of one key exactly one wins and the others
learn it from a 412; every upload carries its token in ``x-amz-meta-nexus-upload``, so a
412 on a retry after a lost reply is recognised as our own write. Small files go up in
one PUT carrying their SHA-256, which S3 checks and keeps: ``stat`` can then report a
SHA-256 the store computed, and ``verify`` trusts it instead of downloading. Large files
go up as a multipart upload (CRC32 per part); any failure, or Ctrl-C, aborts it. Large
downloads fetch ranges in parallel, pinned to the ETag seen first (``If-Match``).

Timeouts, retries and retry notices are ``s3_client``'s. Credentials come only from
boto3's standard chain (environment, profiles, roles).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import math
import re
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

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
from nexus_cli.errors import NexusError, StorageError
from nexus_cli.names import is_version_key
from nexus_cli.storage.base import Leftover
from nexus_cli.storage.bucket import (
    UPLOAD_TOKEN_KEY,
    BucketStore,
    KeyTaken,
    MiB,
    StoredObject,
    one_line,
)
from nexus_cli.storage.s3_client import READ_TIMEOUT, SILENT_ATTEMPTS, make_client
from nexus_cli.transfer import Digest

#: files below this go up in one PUT (held in memory, at most this big), larger ones in parts
DEFAULT_MULTIPART_THRESHOLD = 64 * MiB
#: part size for uploads and range size for downloads; S3 wants at least 5 MiB per part
DEFAULT_PART_SIZE = 8 * MiB
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
    "write": "s3:PutObject and s3:AbortMultipartUpload (and s3:GetObject, to recognise a "
    "retried write)",
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


@dataclass(frozen=True)
class _Upload:
    """A multipart upload in progress."""

    name: str
    upload_id: str
    token: str


class S3Store(BucketStore):
    """Objects in an S3 bucket under an optional key prefix."""

    provider = "s3"
    scheme = "s3"
    sdk_errors = (ClientError, BotoCoreError)
    missing_bucket_hint = "create it, or fix storage.bucket / NEXUS_BUCKET (and storage.region)"

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
        super().__init__(
            bucket,
            prefix,
            part_size=part_size,
            single_request_max=max(multipart_threshold, 1) - 1,
            max_concurrency=max_concurrency,
        )
        self.endpoint_url = endpoint_url or None
        self.region = region or None
        self.provider = provider
        self._watch = None
        if client is None:
            try:
                client, self._watch = make_client(
                    self.endpoint_url, self.region, self.max_concurrency + 2, self.describe()
                )
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

    # errors ---------------------------------------------------------------------------

    def _endpoint(self) -> str:
        if self.endpoint_url:
            return f"the endpoint {self.endpoint_url}"
        return f"S3 in {self.region or self._client.meta.region_name or 'the default region'}"

    def _translate(self, exc: BaseException, action: str, key: str | None) -> NexusError:
        """One line that names the bucket or endpoint and what to check."""
        where = self._uri(key)
        if isinstance(exc, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
            return StorageError(
                f"no usable AWS credentials to {action} {where}: {one_line(exc)}",
                hint=_CREDENTIALS_HINT,
            )
        if isinstance(exc, ReadTimeoutError):
            tries = "once" if self._watch is None else f"{SILENT_ATTEMPTS} times"
            return StorageError(
                f"{self._endpoint()} accepted the connection but did not answer within "
                f"{READ_TIMEOUT} s (tried {tries}) to {action} {where}",
                hint="check that storage.endpoint_url / NEXUS_ENDPOINT_URL names an S3 server "
                "and that the server is healthy",
            )
        if isinstance(exc, BotoConnectionError | ConnectionClosedError):
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
            return self._missing_object(key)
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

    # what the template asks of a provider ---------------------------------------------

    def _bucket_exists(self) -> bool:
        try:
            self._client.head_bucket(Bucket=self.bucket_name)
        except ClientError as exc:
            code, status = _error_code(exc)
            if status == 404 or code == "NoSuchBucket":
                return False
            if status != 403:  # 403: allowed to read objects but not to list; that's fine
                raise self._translate(exc, "check", None) from exc
        return True

    def _lookup(self, key: str) -> StoredObject | None:
        head = self._head(key)
        if head is None:
            return None
        return StoredObject(
            size=head["ContentLength"],
            version=head["ETag"],
            sha256=_store_sha256(head),
            upload_token=(head.get("Metadata") or {}).get(UPLOAD_TOKEN_KEY),
        )

    def _head(self, key: str) -> dict[str, Any] | None:
        name = self._name(key)
        try:
            return self._client.head_object(
                Bucket=self.bucket_name, Key=name, ChecksumMode="ENABLED"
            )
        except ClientError as exc:
            status = _error_code(exc)[1]
            if status == 404:
                return None
            if status == 403:
                self._explain_forbidden(name, key, exc)
            raise self._translate(exc, "check", key) from exc

    def _explain_forbidden(self, name: str, key: str, exc: ClientError) -> None:
        """A HEAD 403 has no body; a one-byte GET tells bad credentials from a denial."""
        try:
            answer = self._client.get_object(Bucket=self.bucket_name, Key=name, Range="bytes=0-0")
            answer["Body"].close()
        except ClientError as probe:
            if _error_code(probe)[1] in (401, 403):
                raise self._translate(probe, "check", key) from exc
        except BotoCoreError:
            pass

    def _taken(self, exc: ClientError, name: str, if_absent: bool) -> bool:
        """Whether a failed create-only write met a taken key.

        412: the key exists. 409: a concurrent conditional write to it was in flight; if
        that one has landed, the key is taken (only for create-only writes).
        """
        status = _error_code(exc)[1]
        if status == 412:
            return True
        return status == 409 and if_absent and self._head(self._key(name)) is not None

    def _put_small(
        self, name: str, body: bytes, digest: Digest, if_absent: bool, token: str
    ) -> None:
        """One PUT carrying the SHA-256 computed while the file was read; S3 checks and
        keeps it. A 409 without a winner yet is tried again."""
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
                    Metadata={UPLOAD_TOKEN_KEY: token},
                    **condition,
                )
                return
            except ClientError as exc:
                if self._taken(exc, name, if_absent):
                    raise KeyTaken from exc
                if _error_code(exc)[1] != 409 or attempt == 3:
                    raise
                time.sleep(0.2 * 2**attempt)

    def _part_size_for(self, size: int) -> int:
        return max(self.part_size, math.ceil(size / MAX_PARTS))

    def _start_parts(self, name: str, token: str) -> _Upload:
        answer = self._client.create_multipart_upload(
            Bucket=self.bucket_name,
            Key=name,
            ChecksumAlgorithm="CRC32",
            Metadata={UPLOAD_TOKEN_KEY: token},
        )
        return _Upload(name, answer["UploadId"], token)

    def _send_part(self, upload: _Upload, number: int, chunk: bytes | bytearray) -> dict[str, Any]:
        answer = self._client.upload_part(
            Bucket=self.bucket_name,
            Key=upload.name,
            UploadId=upload.upload_id,
            PartNumber=number,
            Body=chunk,
            ChecksumAlgorithm="CRC32",
        )
        done = {"PartNumber": number, "ETag": answer["ETag"]}
        if answer.get("ChecksumCRC32"):
            done["ChecksumCRC32"] = answer["ChecksumCRC32"]
        return done

    def _finish_parts(self, upload: _Upload, parts: list[Any], if_absent: bool) -> None:
        """Complete the upload (create-only where asked).

        A retried completion whose first reply was lost finds either the key taken (412)
        or the upload gone (NoSuchUpload): both are our own write when the object carries
        our token, which the template checks for the 412; the other is checked here.
        """
        condition = {"IfNoneMatch": "*"} if if_absent else {}
        try:
            self._client.complete_multipart_upload(
                Bucket=self.bucket_name,
                Key=upload.name,
                UploadId=upload.upload_id,
                MultipartUpload={"Parts": parts},
                **condition,
            )
        except ClientError as exc:
            if self._taken(exc, upload.name, if_absent):
                raise KeyTaken from exc
            if _error_code(exc)[0] == "NoSuchUpload" and self._written_by(
                self._key(upload.name), upload.token
            ):
                return
            raise

    def _abort_parts(self, upload: _Upload) -> None:
        """Best effort: a failed abort leaves parts for `nexus gc` or a lifecycle rule."""
        with contextlib.suppress(ClientError, BotoCoreError):
            self._client.abort_multipart_upload(
                Bucket=self.bucket_name, Key=upload.name, UploadId=upload.upload_id
            )

    def _fetch_range(self, name: str, version: Any, span: tuple[int, int]) -> bytes:
        """One range of the object as it was when first seen (``If-Match``), read in full.

        botocore retries failed requests; a body that breaks off mid-read is retried here.
        """
        start, end = span
        for attempt in range(3):
            try:
                answer = self._client.get_object(
                    Bucket=self.bucket_name,
                    Key=name,
                    Range=f"bytes={start}-{end - 1}",
                    IfMatch=version,
                )
            except ClientError as exc:
                if _error_code(exc)[1] == 412:
                    raise self._changed_error(self._key(name)) from exc
                raise
            try:
                with closing(answer["Body"]) as body:
                    return body.read()
            except _STREAM_ERRORS:
                if attempt == 2 or (self._watch is not None and self._watch.silent):
                    raise
                time.sleep(0.2 * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def _delete_name(self, name: str) -> bool:
        self._client.delete_object(Bucket=self.bucket_name, Key=name)
        return True  # S3 answers 204 for a missing key too

    def _list_names(self, prefix: str) -> Iterator[tuple[str, int]]:
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket_name, Prefix=prefix
        )
        for page in pages:
            for item in page.get("Contents", []):
                yield item["Key"], item["Size"]

    # what interrupted uploads leave -----------------------------------------------------

    def leftovers(self, older_than: timedelta) -> Iterator[Leftover]:
        """Multipart uploads under the prefix that were started before the cutoff and
        never completed or aborted (a killed `nexus store`): S3 keeps and bills their parts.

        Only uploads to keys of the shape nexus writes count: a bucket may be shared, and
        another application's upload in flight is not ours to abort.
        """
        cutoff = datetime.now(UTC) - older_than
        with self._translated("list uploads in"):
            pages = self._client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket_name, Prefix=self._root
            )
            for page in pages:
                for upload in page.get("Uploads", []):
                    started = upload["Initiated"].astimezone(UTC)
                    if started < cutoff and is_version_key(self._key(upload["Key"])):
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
