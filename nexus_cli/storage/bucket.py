"""What the cloud backends share: a bucket, an optional key prefix, and naming in messages."""

from __future__ import annotations

from typing import ClassVar

from nexus_cli.errors import ObjectExistsError
from nexus_cli.names import validate_storage_key
from nexus_cli.storage.base import ObjectStore
from nexus_cli.transfer import Digest

MiB = 1024 * 1024


def one_line(text: object) -> str:
    """An SDK message folded onto one line: every error nexus prints is one line."""
    return " ".join(str(text).split())


class BucketStore(ObjectStore):
    """An object store whose keys live in one bucket, under an optional prefix."""

    #: the URI scheme used in messages: ``s3`` or ``gs``
    scheme: ClassVar[str] = ""

    def __init__(self, bucket: str, prefix: str = "") -> None:
        self.bucket_name = bucket
        self.prefix = prefix.strip("/")

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
