"""What the cloud backends share: one template for every operation on a bucket.

A provider (``S3Store``, ``GCSStore``) is the few calls that differ between SDKs; the
template here decides everything else, once:

- naming: a bucket, an optional key prefix, ``scheme://bucket/prefix/key`` in messages;
- errors: every SDK exception raised inside ``_translated`` goes through the provider's
  ``_translate`` into one of ours, ``raise ... from exc``;
- the bucket check: after an ambiguous 404, ask once whether the bucket exists;
- ``put_file``: the source is read once through ``SourceFile`` (a read failure is the
  user's path problem, exit 2); up to ``single_request_max`` bytes go up in one
  request, larger files as parts read in order, hashed on the way and sent on a bounded
  thread pool, in any order (a slow part holds up only itself); any failure aborts the
  parts;
- create-only writes and lost replies: each upload carries a random token in the
  object's metadata. When the create-only request meets a taken key (a 412, typically
  the SDK's retry of a request whose reply was lost), the stored object's token tells
  our own write, which succeeded, from another writer's, which is a conflict;
- reads: large objects come as ranges of one version (ETag, generation) in parallel,
  handed over in order.

What a provider supplies is listed under "the provider's part" below.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
from abc import abstractmethod
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from nexus_cli.errors import (
    IntegrityError,
    NexusError,
    NotFoundError,
    ObjectExistsError,
    StorageError,
)
from nexus_cli.names import validate_storage_key
from nexus_cli.storage.base import ObjectInfo, ObjectStore
from nexus_cli.transfer import (
    Digest,
    Part,
    Progress,
    SourceFile,
    byte_ranges,
    no_progress,
    ordered_parallel,
    pooled_parts,
    read_hashed,
    unordered_parallel,
)

MiB = 1024 * 1024
#: the object metadata entry that carries an upload's token (S3 ``x-amz-meta-nexus-upload``)
UPLOAD_TOKEN_KEY = "nexus-upload"
#: where a provider keeps temporary objects, under the store prefix; never listed
TEMP_ROOT = ".nexus-uploads"


def one_line(text: object) -> str:
    """An SDK message folded onto one line: every error nexus prints is one line."""
    return " ".join(str(text).split())


class KeyTaken(Exception):
    """A provider's create-only request found the key taken (412 or the like).

    Raised by ``_put_small`` and ``_finish_parts``; the template decides whether the
    object there is our own write (a retry after a lost reply) or another writer's.
    """


@dataclass(frozen=True)
class StoredObject:
    """What a provider's ``_lookup`` found at a key."""

    size: int
    #: what ranged reads pin, so that every range comes from this one version
    version: Any
    #: a SHA-256 the store computed over the whole object, or ``None``
    sha256: str | None = None
    #: the token of the upload that wrote it (``None``: written by something else)
    upload_token: str | None = None


class BucketStore(ObjectStore):
    """An object store whose keys live in one bucket, under an optional prefix."""

    #: the URI scheme used in messages: ``s3`` or ``gs``
    scheme: ClassVar[str] = ""
    #: the SDK exceptions ``_translate`` turns into ours
    sdk_errors: ClassVar[tuple[type[BaseException], ...]] = ()
    #: what to fix when the bucket is missing
    missing_bucket_hint: ClassVar[str] = "create it, or fix storage.bucket / NEXUS_BUCKET"

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        part_size: int,
        single_request_max: int,
        max_concurrency: int,
    ) -> None:
        self.bucket_name = bucket
        self.prefix = prefix.strip("/")
        #: part size for uploads and range size for downloads
        self.part_size = part_size
        #: the largest file sent in one request (held in memory, at most this big)
        self.single_request_max = single_request_max
        #: parts or ranges in flight at once; memory stays near (this + 1) * part size
        self.max_concurrency = max(max_concurrency, 1)
        self._bucket_checked = False

    # the provider's part ------------------------------------------------------------

    @abstractmethod
    def _endpoint(self) -> str:
        """Where requests go, for messages (``the endpoint http://...``)."""

    @abstractmethod
    def _translate(self, exc: BaseException, action: str, key: str | None) -> NexusError:
        """One of our errors for an SDK error met while trying to ``action`` ``key``."""

    @abstractmethod
    def _bucket_exists(self) -> bool:
        """Whether the bucket exists; being denied the question counts as yes."""

    @abstractmethod
    def _lookup(self, key: str) -> StoredObject | None:
        """The object at ``key``, or ``None`` when the store answers 404."""

    @abstractmethod
    def _put_small(
        self, name: str, body: bytes, digest: Digest, if_absent: bool, token: str
    ) -> None:
        """Write ``body`` at ``name`` in one request tagged with ``token``; ``KeyTaken``
        when ``if_absent`` and the name is taken."""

    @abstractmethod
    def _start_parts(self, name: str, token: str) -> Any:
        """Begin a parts upload to ``name`` tagged with ``token``; returns its handle."""

    @abstractmethod
    def _send_part(self, upload: Any, number: int, chunk: bytes) -> Any:
        """Upload part ``number`` (from 1); returns what ``_finish_parts`` needs of it."""

    @abstractmethod
    def _finish_parts(self, upload: Any, parts: list[Any], if_absent: bool) -> None:
        """Join the parts, in order, into the object; ``KeyTaken`` as ``_put_small``."""

    @abstractmethod
    def _abort_parts(self, upload: Any) -> None:
        """Best effort, after any failure: leave no parts behind."""

    @abstractmethod
    def _fetch_range(self, name: str, version: Any, span: tuple[int, int]) -> bytes:
        """Bytes ``span`` (end exclusive) of version ``version`` of ``name``; an
        ``IntegrityError`` (``_changed_error``) when that version is gone."""

    @abstractmethod
    def _delete_name(self, name: str) -> bool:
        """Delete ``name``; ``False`` when the store answered 404."""

    @abstractmethod
    def _list_names(self, prefix: str) -> Iterator[tuple[str, int]]:
        """``(object name, size)`` of every object whose name starts with ``prefix``."""

    # names and messages ---------------------------------------------------------------

    @property
    def _root(self) -> str:
        return f"{self.prefix}/" if self.prefix else ""

    def _name(self, key: str) -> str:
        """The bucket's object name for ``key`` (checked first: it must not escape the root)."""
        return self._root + validate_storage_key(key)

    def _key(self, name: str) -> str:
        """The key of a listed object name (the inverse of ``_name``)."""
        return name[len(self._root) :]

    def _uri(self, key: str | None = None) -> str:
        parts = [p for p in (self.prefix, key) if p]
        return f"{self.scheme}://{self.bucket_name}/{'/'.join(parts)}".rstrip("/")

    def describe(self) -> str:
        return self._uri()

    def _exists_error(self, key: str, digest: Digest) -> ObjectExistsError:
        return ObjectExistsError(f"{key} already exists in {self.describe()}", digest=digest)

    def _missing_bucket(self) -> StorageError:
        return StorageError(
            f"bucket {self.bucket_name!r} does not exist at {self._endpoint()}",
            hint=self.missing_bucket_hint,
        )

    def _missing_object(self, key: str) -> NotFoundError:
        return NotFoundError(f"object {key} is missing from {self.describe()}")

    def _changed_error(self, key: str) -> IntegrityError:
        return IntegrityError(f"object {key} in {self.describe()} changed while it was being read")

    @contextlib.contextmanager
    def _translated(self, action: str, key: str | None = None) -> Iterator[None]:
        try:
            yield
        except self.sdk_errors as exc:
            raise self._translate(exc, action, key) from exc

    def _check_bucket(self) -> None:
        """Tell a missing bucket from a missing key after an ambiguous 404 (asked once)."""
        if self._bucket_checked:
            return
        if not self._bucket_exists():
            raise self._missing_bucket()
        self._bucket_checked = True

    def _find(self, key: str) -> StoredObject | None:
        found = self._lookup(key)
        if found is None:
            self._check_bucket()
        return found

    # the interface --------------------------------------------------------------------

    def stat(self, key: str) -> ObjectInfo | None:
        with self._translated("check", key):
            found = self._find(key)
        return None if found is None else ObjectInfo(key, found.size, found.sha256)

    def put_file(
        self, source: Path, key: str, *, if_absent: bool = True, progress: Progress = no_progress
    ) -> Digest:
        name = self._name(key)
        token = secrets.token_hex(16)
        with SourceFile(source) as reader, self._translated("write", key):
            if reader.size <= self.single_request_max:
                body, digest = read_hashed(reader)
                put = lambda: self._put_small(name, body, digest, if_absent, token)  # noqa: E731
                self._create(key, digest, token, put)
                progress(digest.size)
                return digest
            return self._put_parts(reader, name, key, if_absent, token, progress)

    def _put_parts(
        self,
        reader: SourceFile,
        name: str,
        key: str,
        if_absent: bool,
        token: str,
        progress: Progress,
    ) -> Digest:
        """Parts read once, in order, into reused buffers, hashed as read, sent in parallel
        and in any order; aborted on any failure."""
        upload = self._start_parts(name, token)

        def send(part: Part) -> tuple[int, int, Any]:
            try:
                return len(part.data), part.number, self._send_part(upload, part.number, part.data)
            finally:
                part.release()

        sha256 = hashlib.sha256()
        try:
            sent_parts, size = [], 0
            chunks = pooled_parts(
                reader, self._part_size_for(reader.size), self.max_concurrency + 1, sha256
            )
            with closing(unordered_parallel(send, chunks, self.max_concurrency)) as sent:
                for count, number, part in sent:
                    sent_parts.append((number, part))
                    size += count
                    progress(count)
            parts = [part for _, part in sorted(sent_parts, key=lambda pair: pair[0])]
            digest = Digest(sha256.hexdigest(), size)
            self._create(key, digest, token, lambda: self._finish_parts(upload, parts, if_absent))
            return digest
        except BaseException:
            self._abort_parts(upload)
            raise

    def _part_size_for(self, size: int) -> int:
        """The part size for a file of ``size`` bytes (providers cap the part count)."""
        return self.part_size

    def _create(self, key: str, digest: Digest, token: str, write: Callable[[], None]) -> None:
        """Run the request that makes the object; a taken key is ours or a conflict."""
        try:
            write()
        except KeyTaken as taken:
            if not self._written_by(key, token):
                raise self._exists_error(key, digest) from taken

    def _written_by(self, key: str, token: str) -> bool:
        """Whether the object at ``key`` is the one the upload tagged ``token`` wrote."""
        found = self._lookup(key)
        return found is not None and found.upload_token == token

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        """The bytes of one version in order; large objects come in parallel ranges."""
        with self._translated("read", key):
            found = self._find(key)
            if found is None:
                raise self._missing_object(key)
            name = self._name(key)

            def fetch(span: tuple[int, int]) -> bytes:
                data = self._fetch_range(name, found.version, span)
                if len(data) != span[1] - span[0]:
                    raise IntegrityError(
                        f"{key} in {self.describe()}: range {span[0]}-{span[1]} gave "
                        f"{len(data)} bytes"
                    )
                return data

            ranges = byte_ranges(found.size, self.part_size)
            with closing(ordered_parallel(fetch, ranges, self.max_concurrency)) as chunks:
                yield from chunks

    def delete(self, key: str) -> None:
        name = self._name(key)
        with self._translated("delete", key):
            if not self._delete_name(name):
                self._check_bucket()

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        with self._translated("list"):
            for name, size in self._list_names(self._root + prefix):
                key = self._key(name)
                if not key.startswith(f"{TEMP_ROOT}/"):
                    yield ObjectInfo(key=key, size=size)
