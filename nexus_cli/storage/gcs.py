"""Google Cloud Storage, through google-cloud-storage.

The shape of every operation is ``BucketStore``'s; this module is the GCS calls.
Create-only writes use ``ifGenerationMatch=0``, which GCS checks atomically: of several
writers of one key exactly one wins and the others get a 412.

Large files go up as a *parallel composite upload*: parts are read from the file once,
in order, hashed on the way and uploaded in parallel as temporary objects under
``.nexus-uploads/<random>/``, then one ``compose`` call (create-only on the destination)
joins them and the temporary objects are deleted. Temporary names are random, so parts
and intermediate composes carry no precondition: a retry after a lost reply simply
writes the same bytes again instead of failing with a 412. GCS's XML multipart API
would avoid the temporary objects, but it accepts no preconditions, so a racing writer
could silently replace the winner; compose does accept them. Large downloads fetch
ranges of one generation in parallel and hand them over in order. Every upload carries
its token in the object's metadata (``nexus-upload``), so a 412 on the SDK's retry after
a lost reply is recognised as our own write.

GCS keeps a CRC32C and (for non-composite objects) an MD5, never a SHA-256, so ``stat``
reports no SHA-256 and ``verify`` re-reads the bytes.

Credentials come only from the SDK's chain: ``GOOGLE_APPLICATION_CREDENTIALS``, gcloud's
application-default login, an attached service account; with ``STORAGE_EMULATOR_HOST``
set the SDK talks to that emulator, anonymously.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import secrets
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import requests
import urllib3
from google.api_core import exceptions as api_errors
from google.api_core.retry import Retry
from google.auth import exceptions as auth_errors
from google.cloud import storage
from google.cloud.storage import exceptions as media_errors
from urllib3.exceptions import NewConnectionError

from nexus_cli.config import StorageConfig
from nexus_cli.errors import IntegrityError, NexusError, StorageError
from nexus_cli.storage.base import Leftover
from nexus_cli.storage.bucket import (
    TEMP_ROOT,
    UPLOAD_TOKEN_KEY,
    BucketStore,
    KeyTaken,
    MiB,
    StoredObject,
    one_line,
)
from nexus_cli.storage.notices import notice
from nexus_cli.transfer import Digest, ordered_parallel

#: the most the SDK sends in one request; above it, it opens a resumable session
SINGLE_REQUEST_MAX = 8 * MiB
#: part size for composite uploads and range size for downloads
DEFAULT_PART_SIZE = SINGLE_REQUEST_MAX
#: files above this go up as parallel parts; at most SINGLE_REQUEST_MAX, so that every
#: create-only decision is one request (a single upload, or the compose)
DEFAULT_PARALLEL_THRESHOLD = SINGLE_REQUEST_MAX
DEFAULT_MAX_CONCURRENCY = 8
MAX_COMPOSE_SOURCES = 32
# temporary part objects live under TEMP_ROOT, under the store prefix; ``list`` never shows them

_PERMISSIONS = {
    "read": "storage.objects.get",
    "check": "storage.objects.get",
    "write": "storage.objects.create and storage.objects.delete",
    "list": "storage.objects.list",
    "delete": "storage.objects.delete",
    "list uploads in": "storage.objects.list",
    "remove": "storage.objects.delete",
}
_CREDENTIALS_HINT = (
    "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, run "
    "`gcloud auth application-default login`, or run with an attached service account"
)
_SERVER_TROUBLE = (
    api_errors.TooManyRequests,
    api_errors.InternalServerError,
    api_errors.BadGateway,
    api_errors.ServiceUnavailable,
    api_errors.GatewayTimeout,
)
_RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
_NETWORK_BLIPS = (
    ConnectionError,  # resets and aborts
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    http.client.IncompleteRead,
    urllib3.exceptions.ProtocolError,
    urllib3.exceptions.TimeoutError,
    auth_errors.TransportError,
)
_TRANSLATED = (
    api_errors.GoogleAPICallError,
    api_errors.RetryError,
    auth_errors.GoogleAuthError,
    requests.RequestException,
    media_errors.InvalidResponse,
    media_errors.DataCorruption,
)


def _refused(exc: requests.ConnectionError) -> bool:
    """Nothing listens there or the name does not resolve: a setup error, not a blip."""
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(reason, NewConnectionError)


def is_transient(exc: BaseException) -> bool:
    """Worth another try with backoff: throttling, server trouble, a dropped connection.

    Like the SDK's own predicate, except that a refused connection or an unknown host
    fails at once: that is a wrong endpoint, and waiting will not fix it.
    """
    if isinstance(exc, api_errors.GoogleAPICallError):
        return exc.code in _RETRYABLE_STATUS
    if isinstance(exc, media_errors.InvalidResponse):
        return exc.response.status_code in _RETRYABLE_STATUS
    if isinstance(exc, requests.ConnectionError) and _refused(exc):
        return False
    return isinstance(exc, _NETWORK_BLIPS)


def _retry_notice(exc: BaseException) -> None:
    """Say on the terminal that a request is tried again, and why."""
    if isinstance(exc, api_errors.GoogleAPICallError):
        reason = f"GCS answered {exc.code}"
    elif isinstance(exc, media_errors.InvalidResponse):
        reason = f"GCS answered {exc.response.status_code}"
    else:
        reason = f"the connection failed ({type(exc).__name__})"
    notice(f"a GCS request failed: {reason}; retrying")


#: seconds to connect, and to wait for a byte of an answer (the SDK's default is 60)
CONNECT_TIMEOUT, READ_TIMEOUT = 5, 15
TIMEOUT = (CONNECT_TIMEOUT, READ_TIMEOUT)
#: exponential backoff from 0.5 s to 8 s, for transient errors only, tried again until
#: 40 s have passed: an endpoint that never answers fails a command within a minute
RETRY = Retry(
    predicate=is_transient,
    initial=0.5,
    maximum=8.0,
    multiplier=2.0,
    timeout=40.0,
    on_error=_retry_notice,
)


def make_client(endpoint_url: str | None) -> storage.Client:
    """A client on the SDK's credential chain; ``STORAGE_EMULATOR_HOST`` wins when set."""
    options = {"api_endpoint": endpoint_url} if endpoint_url else None
    # a project is needed only to create or list buckets, which nexus never does
    project = os.environ.get("GOOGLE_CLOUD_PROJECT") or None
    return storage.Client(project=project, client_options=options)


@dataclass
class _Composite:
    """A parallel composite upload in progress: its parts live under ``temp_prefix``."""

    name: str
    temp_prefix: str
    token: str
    cleaned: bool = field(default=False)


class GCSStore(BucketStore):
    """Objects in a GCS bucket under an optional name prefix."""

    provider = "gcs"
    scheme = "gs"
    sdk_errors = _TRANSLATED

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        client: storage.Client | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        parallel_threshold: int = DEFAULT_PARALLEL_THRESHOLD,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    ) -> None:
        if parallel_threshold > SINGLE_REQUEST_MAX:
            raise ValueError(f"parallel_threshold must be at most {SINGLE_REQUEST_MAX} bytes")
        super().__init__(
            bucket,
            prefix,
            part_size=max(part_size, 256 * 1024),
            single_request_max=parallel_threshold,
            max_concurrency=max_concurrency,
        )
        self.endpoint_url = endpoint_url or None
        if client is None:
            with self._translated("connect to"):
                client = make_client(self.endpoint_url)
        self._client = client
        self._bucket = client.bucket(bucket)

    @property
    def parallel_threshold(self) -> int:
        return self.single_request_max

    @classmethod
    def from_config(cls, config: StorageConfig, base_dir: Path) -> GCSStore:
        return cls(config.bucket, prefix=config.prefix, endpoint_url=config.endpoint_url or None)

    # errors ---------------------------------------------------------------------------

    def _endpoint(self) -> str:
        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        if emulator:
            return f"the GCS emulator at {emulator} (STORAGE_EMULATOR_HOST)"
        return f"the GCS endpoint {self.endpoint_url or 'https://storage.googleapis.com'}"

    def _translate(self, exc: BaseException, action: str, key: str | None) -> NexusError:
        """One line that names the bucket or endpoint and what to check."""
        if isinstance(exc, api_errors.RetryError) and exc.cause is not None:
            exc = exc.cause
        where = self._uri(key)
        if isinstance(exc, auth_errors.DefaultCredentialsError):
            return StorageError(
                f"no Google Cloud credentials found to {action} {where}", hint=_CREDENTIALS_HINT
            )
        if isinstance(exc, auth_errors.RefreshError | api_errors.Unauthorized):
            return StorageError(
                f"Google rejected the credentials used to {action} {where}: {one_line(exc)}",
                hint="check GOOGLE_APPLICATION_CREDENTIALS or renew the gcloud login",
            )
        if isinstance(exc, requests.ReadTimeout):
            return StorageError(
                f"{self._endpoint()} accepted the connection but did not answer within "
                f"{READ_TIMEOUT} s to {action} {where}",
                hint="check that the endpoint is a GCS server and that it is healthy",
            )
        if isinstance(exc, requests.RequestException | auth_errors.TransportError):
            return StorageError(
                f"cannot reach {self._endpoint()} to {action} {where}",
                hint="check the network and proxy, storage.endpoint_url, or the emulator",
            )
        if isinstance(exc, media_errors.DataCorruption):
            return IntegrityError(f"GCS checksum mismatch for {where}: {one_line(exc)}")
        if isinstance(exc, api_errors.NotFound):
            if action == "read" and key:
                return self._missing_object(key)
            return self._missing_bucket()
        if isinstance(exc, api_errors.Forbidden):
            return StorageError(
                f"access denied: cannot {action} {where}",
                hint=f"the account needs {_PERMISSIONS.get(action, action)} on the bucket "
                "(roles/storage.objectAdmin has them)",
            )
        if isinstance(exc, _SERVER_TROUBLE):
            return StorageError(
                f"{self._endpoint()} kept failing to {action} {where} after retries",
                hint="the service is throttling or unavailable: try again later",
            )
        return StorageError(f"GCS failed to {action} {where}: {one_line(exc)}")

    # what the template asks of a provider ---------------------------------------------

    def _bucket_exists(self) -> bool:
        try:
            return self._bucket.exists(retry=RETRY, timeout=TIMEOUT)
        except api_errors.Forbidden:  # may read objects but not the bucket: that's fine
            return True

    def _lookup(self, key: str) -> StoredObject | None:
        blob = self._get_blob(key)
        if blob is None:
            return None
        return StoredObject(
            size=blob.size or 0,
            version=blob.generation,
            upload_token=(blob.metadata or {}).get(UPLOAD_TOKEN_KEY),
        )

    def _get_blob(self, key: str) -> storage.Blob | None:
        return self._bucket.get_blob(self._name(key), retry=RETRY, timeout=TIMEOUT)

    def _tagged_blob(self, name: str, token: str) -> storage.Blob:
        blob = self._bucket.blob(name)
        blob.metadata = {UPLOAD_TOKEN_KEY: token}
        return blob

    def _put_small(
        self, name: str, body: bytes, digest: Digest, if_absent: bool, token: str
    ) -> None:
        """One request, create-only with generation 0 where asked."""
        try:
            self._tagged_blob(name, token).upload_from_string(
                body, if_generation_match=0 if if_absent else None, retry=RETRY, timeout=TIMEOUT
            )
        except api_errors.PreconditionFailed as exc:
            raise KeyTaken from exc

    def _start_parts(self, name: str, token: str) -> _Composite:
        temp_prefix = self._name(f"{TEMP_ROOT}/{secrets.token_hex(8)}") + "/"
        return _Composite(name, temp_prefix, token)

    def _send_part(self, upload: _Composite, number: int, chunk: bytes | bytearray) -> str:
        part_name = f"{upload.temp_prefix}{number:05d}"
        # no precondition: the name is random, so nobody else writes it, and a retry
        # after a lost reply must overwrite the part rather than fail with a 412
        self._bucket.blob(part_name).upload_from_string(bytes(chunk), retry=RETRY, timeout=TIMEOUT)
        return part_name

    def _finish_parts(self, upload: _Composite, parts: list[Any], if_absent: bool) -> None:
        """One create-only compose of the parts (through intermediate objects past 32
        sources); the temporary objects are deleted whatever happens."""
        try:
            self._compose(parts, upload, 0 if if_absent else None)
        except api_errors.PreconditionFailed as exc:
            raise KeyTaken from exc
        finally:
            self._abort_parts(upload)

    def _compose(
        self, names: list[str], upload: _Composite, if_generation_match: int | None
    ) -> None:
        """Join ``names`` into the upload's name, through intermediate objects past 32.

        Intermediate objects get random temporary names and no precondition (a retried
        compose rewrites the same bytes); only the last compose, onto the destination,
        carries ``if_generation_match`` and the upload's token.
        """
        level = 0
        while len(names) > MAX_COMPOSE_SOURCES:
            groups = [
                names[i : i + MAX_COMPOSE_SOURCES]
                for i in range(0, len(names), MAX_COMPOSE_SOURCES)
            ]
            names = [
                self._compose_one(
                    group, self._bucket.blob(f"{upload.temp_prefix}c{level}-{index:05d}"), None
                )
                for index, group in enumerate(groups)
            ]
            level += 1
        destination = self._tagged_blob(upload.name, upload.token)
        self._compose_one(names, destination, if_generation_match)

    def _compose_one(
        self, sources: list[str], destination: storage.Blob, if_generation_match: int | None
    ) -> str:
        destination.compose(
            [self._bucket.blob(source) for source in sources],
            if_generation_match=if_generation_match,
            retry=RETRY,
            timeout=TIMEOUT,
        )
        return destination.name

    def _abort_parts(self, upload: _Composite) -> None:
        """Delete the temporary objects (best effort: `nexus gc` finds what is left)."""
        if upload.cleaned:
            return
        upload.cleaned = True

        def remove(blob: storage.Blob) -> None:
            with contextlib.suppress(api_errors.NotFound):
                blob.delete(retry=RETRY, timeout=TIMEOUT)

        with contextlib.suppress(*_TRANSLATED):
            blobs = self._client.list_blobs(
                self._bucket, prefix=upload.temp_prefix, retry=RETRY, timeout=TIMEOUT
            )
            with closing(ordered_parallel(remove, blobs, self.max_concurrency)) as removed:
                for _ in removed:
                    pass

    def _fetch_range(self, name: str, version: Any, span: tuple[int, int]) -> bytes:
        start, end = span
        # one Blob per range: download_as_bytes rewrites the blob's properties from each
        # response, so a Blob shared between threads would race
        pinned = self._bucket.blob(name, generation=version)
        try:
            return pinned.download_as_bytes(
                start=start, end=end - 1, checksum=None, retry=RETRY, timeout=TIMEOUT
            )
        except api_errors.NotFound as exc:
            raise self._changed_error(self._key(name)) from exc

    def _delete_name(self, name: str) -> bool:
        try:
            self._bucket.blob(name).delete(retry=RETRY, timeout=TIMEOUT)
        except api_errors.NotFound:
            return False
        return True

    def _list_names(self, prefix: str) -> Iterator[tuple[str, int]]:
        for blob in self._client.list_blobs(
            self._bucket, prefix=prefix, retry=RETRY, timeout=TIMEOUT
        ):
            yield blob.name, blob.size or 0

    # what interrupted uploads leave -----------------------------------------------------

    def leftovers(self, older_than: timedelta) -> Iterator[Leftover]:
        """Temporary parts under ``.nexus-uploads/`` created before the cutoff: what a
        composite upload leaves when it is killed before it cleans up."""
        cutoff = datetime.now(UTC) - older_than
        with self._translated("list uploads in"):
            for blob in self._client.list_blobs(
                self._bucket, prefix=f"{self._root}{TEMP_ROOT}/", retry=RETRY, timeout=TIMEOUT
            ):
                created = (blob.time_created or datetime.now(UTC)).astimezone(UTC)
                if created < cutoff:
                    yield Leftover("temporary_part", self._key(blob.name), blob.size, created)

    def remove_leftover(self, leftover: Leftover) -> None:
        if leftover.kind != "temporary_part" or not leftover.name.startswith(f"{TEMP_ROOT}/"):
            raise ValueError(f"{leftover.name} is not a temporary part")
        with self._translated("remove", leftover.name), contextlib.suppress(api_errors.NotFound):
            self._bucket.blob(self._name(leftover.name)).delete(retry=RETRY, timeout=TIMEOUT)
