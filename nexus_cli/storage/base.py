"""The one interface every object store implements.

A backend moves bytes and answers questions about keys; it knows nothing of models,
commits or metadata. Keys are ``/``-separated and relative to the store root (bucket
plus prefix, or a local folder); ``validate_storage_key`` has checked them before a
backend sees them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from nexus_cli.names import validate_storage_key
from nexus_cli.transfer import Digest, Progress, VerifiedSink, hash_stream, no_progress


@dataclass(frozen=True)
class ObjectInfo:
    """What a store says about one object.

    ``sha256`` is set only when the store itself computed it over the bytes it holds
    (a cloud store's checksum), never from a client's claim; ``None`` means "re-read
    the bytes to know".
    """

    key: str
    size: int
    sha256: str | None = None


@dataclass(frozen=True)
class Leftover:
    """Something an interrupted upload left in a store: never a stored version.

    ``kind`` is ``"multipart_upload"`` (S3: parts of an upload never completed or
    aborted), ``"temporary_part"`` (GCS: a part object under ``.nexus-uploads/``) or
    ``"incomplete_file"`` (local: a hidden ``.<name>.<random>.incomplete`` file).
    ``name`` is the key, object name or path relative to the store root, as the store
    names it; ``started_at`` is when the upload began (local: the file's last write), UTC.
    """

    kind: str
    name: str
    size: int | None
    started_at: datetime
    upload_id: str | None = None


class ObjectStore(ABC):
    """Put, get, stat, list and delete whole objects, streaming, never all in memory."""

    #: the provider name as written in `.nexusrc`
    provider: str = ""

    @abstractmethod
    def describe(self) -> str:
        """Where this store keeps objects, for messages (``s3://bucket/prefix``, a path)."""

    @abstractmethod
    def put_file(
        self, source: Path, key: str, *, if_absent: bool = True, progress: Progress = no_progress
    ) -> Digest:
        """Upload ``source`` to ``key`` and return the digest of the bytes sent.

        The file is read once: the sha256 is computed from the same bytes that go out.
        With ``if_absent`` the write is create-only: when ``key`` is taken (also by a
        writer that finished first during this call) it raises ``ObjectExistsError``
        carrying the digest, and the stored object is left as it was. A failed or
        interrupted write never leaves a partial object at ``key``.
        """

    @abstractmethod
    def iter_bytes(self, key: str) -> Iterator[bytes]:
        """Yield the object's bytes in order; ``NotFoundError`` when there is none."""

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo | None:
        """Size (and a store-computed sha256 where there is one) or ``None`` when missing."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; removing a missing key is not an error."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every complete object whose key starts with ``prefix``."""

    @abstractmethod
    def leftovers(self, older_than: timedelta) -> Iterator[Leftover]:
        """What interrupted uploads left behind that is older than ``older_than``.

        Never a complete object: only in-flight state that no reader can see. An upload
        still running is at most as old as its last progress (local) or its start
        (cloud), so an age longer than any upload takes spares the ones in flight.
        """

    @abstractmethod
    def remove_leftover(self, leftover: Leftover) -> None:
        """Remove one ``leftover`` this store listed; one already gone is not an error."""

    # shared behaviour, built on the primitives above ----------------------------------

    def exists(self, key: str) -> bool:
        return self.stat(key) is not None

    def get_file(
        self, key: str, target: Path, expected: Digest, *, progress: Progress = no_progress
    ) -> Digest:
        """Download ``key`` to ``target``; the file appears only if size and sha256 match.

        Backends with a faster path (parallel ranged reads) override this and keep the
        same promise: bytes are hashed as they arrive and renamed into place at the end.
        """
        validate_storage_key(key)
        with VerifiedSink(target, expected, source=f"{key} in {self.describe()}") as sink:
            for chunk in self.iter_bytes(key):
                sink.write(chunk)
                progress(len(chunk))
            return sink.commit()

    def content_digest(self, key: str, *, progress: Progress = no_progress) -> Digest:
        """The sha256 and size of what the store holds at ``key``, by its bytes.

        A checksum the store computed itself stands in for a re-read.
        """
        info = self.stat(key)
        if info is not None and info.sha256:
            progress(info.size)
            return Digest(info.sha256, info.size)
        return hash_stream(self.iter_bytes(key), progress)
