"""The embedded default: objects are files under a folder (``.nexus/store``), git-ignored."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

from nexus_cli.config import StorageConfig
from nexus_cli.errors import NotFoundError, ObjectExistsError, StorageError
from nexus_cli.files import (
    INCOMPLETE_SUFFIX,
    fsync_dir,
    is_temp_file,
    make_ignored_dir,
    temp_path_beside,
)
from nexus_cli.names import validate_storage_key
from nexus_cli.storage.base import Leftover, ObjectInfo, ObjectStore
from nexus_cli.transfer import (
    Digest,
    Progress,
    SourceFile,
    VerifiedSink,
    copy_file_hashed,
    no_progress,
    read_chunks,
)


class LocalStore(ObjectStore):
    """Objects as plain files; create-only writes are a hard link, which fails if taken."""

    provider = "local"

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def from_config(cls, config: StorageConfig, base_dir: Path) -> LocalStore:
        return cls((base_dir / config.path).resolve())

    def describe(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / validate_storage_key(key)

    def _storage_error(self, action: str, key: str, exc: OSError) -> StorageError:
        return StorageError(
            f"cannot {action} {key!r} in the local store {self.root}: {exc.strerror}",
            hint="check the folder's permissions and free space",
        )

    def put_file(
        self, source: Path, key: str, *, if_absent: bool = True, progress: Progress = no_progress
    ) -> Digest:
        """Copy to a temp file beside the key (by the kernel where it can, hashed as it
        lands), fsync it, then link (create-only) or rename it into place."""
        target = self._path(key)
        with SourceFile(source) as reader:
            temp = temp_path_beside(target)
            try:
                make_ignored_dir(self.root)
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(temp, "x+b") as writer:  # read back by the hasher
                    digest = copy_file_hashed(reader, writer, progress)
                    writer.flush()
                    os.fsync(writer.fileno())
                if if_absent:
                    try:
                        os.link(temp, target)
                    except FileExistsError as exc:
                        raise ObjectExistsError(
                            f"{key} already exists in {self.root}", digest=digest
                        ) from exc
                else:
                    os.replace(temp, target)
                fsync_dir(target.parent)
                return digest
            except OSError as exc:
                raise self._storage_error("write", key, exc) from exc
            finally:
                with contextlib.suppress(OSError):
                    temp.unlink()

    def _open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb", buffering=0)  # noqa: SIM115 - callers close it
        except FileNotFoundError as exc:
            raise NotFoundError(
                f"object {key} is missing from the local store {self.root}"
            ) from exc
        except OSError as exc:
            raise self._storage_error("read", key, exc) from exc

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        with self._open(key) as handle:
            try:
                yield from read_chunks(handle)
            except OSError as exc:
                raise self._storage_error("read", key, exc) from exc

    def get_file(
        self, key: str, target: Path, expected: Digest, *, progress: Progress = no_progress
    ) -> Digest:
        """As the base class, but the kernel copies while the copy is hashed."""
        validate_storage_key(key)
        with (
            self._open(key) as handle,
            VerifiedSink(target, expected, source=f"{key} in {self.root}") as sink,
        ):
            try:
                sink.copy_from(handle, progress)
            except OSError as exc:
                raise self._storage_error("read", key, exc) from exc
            return sink.commit()

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            result = self._path(key).stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._storage_error("stat", key, exc) from exc
        return ObjectInfo(key=key, size=result.st_size)

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise self._storage_error("delete", key, exc) from exc

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        if not self.root.is_dir():
            return
        for directory, subdirs, files in os.walk(self.root):
            subdirs.sort()
            for name in sorted(files):
                # hidden names are ours: in-flight temp files and the .gitignore marker
                if name.startswith(".") or name.endswith(INCOMPLETE_SUFFIX):
                    continue
                path = Path(directory, name)
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    with contextlib.suppress(FileNotFoundError):
                        yield ObjectInfo(key=key, size=path.stat().st_size)

    def leftovers(self, older_than: timedelta) -> Iterator[Leftover]:
        """Temp files of writes that never finished (killed), last written before the cutoff.

        A write in progress touches its temp file with every chunk, so its age is the
        time since it last made progress.
        """
        if not self.root.is_dir():
            return
        cutoff = datetime.now(UTC) - older_than
        try:
            for directory, subdirs, files in os.walk(self.root):
                subdirs.sort()
                for name in sorted(files):
                    if not is_temp_file(name):
                        continue
                    path = Path(directory, name)
                    try:
                        result = path.stat()
                    except FileNotFoundError:  # finished or removed meanwhile
                        continue
                    written = datetime.fromtimestamp(result.st_mtime, UTC)
                    if written < cutoff:
                        relative = path.relative_to(self.root).as_posix()
                        yield Leftover("incomplete_file", relative, result.st_size, written)
        except OSError as exc:
            raise StorageError(
                f"cannot list leftovers in the local store {self.root}: {exc.strerror}"
            ) from exc

    def remove_leftover(self, leftover: Leftover) -> None:
        path = self.root / leftover.name
        if leftover.kind != "incomplete_file" or not is_temp_file(path):
            raise ValueError(f"{leftover.name} is not a leftover of the local store")
        validate_storage_key(leftover.name)  # never outside the root
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise self._storage_error("remove", leftover.name, exc) from exc
