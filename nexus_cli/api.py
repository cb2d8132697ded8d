"""The Python API: store, list, load, roll back and verify model versions.

The CLI is a thin layer over this module; notebooks and the model server use it
directly::

    from nexus_cli import Project

    project = Project.open()                      # .nexus_meta.json at the git root
    project.store("model.pt", "prod_model", message="more data")
    path = project.load("prod_model").path
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path

from nexus_cli.config import StorageConfig, load_config, render_config
from nexus_cli.errors import (
    ConflictError,
    GitError,
    NotFoundError,
    ObjectExistsError,
    UsageError,
)
from nexus_cli.files import atomic_write_text, make_ignored_dir
from nexus_cli.formats import detect_format
from nexus_cli.gitrepo import GitRepo
from nexus_cli.metadata import Metadata, VersionRecord, edit_metadata
from nexus_cli.names import file_extension, storage_key, validate_model_name
from nexus_cli.signature import validate_signature
from nexus_cli.storage import ObjectStore, open_store
from nexus_cli.transfer import Digest, Progress, hash_file

META_FILENAME = ".nexus_meta.json"
CONFIG_FILENAME = ".nexusrc"

#: ``reporter(description, total_bytes)`` returns a context that yields a progress callback
ProgressReporter = Callable[[str, int], AbstractContextManager[Progress]]


def silent_progress(_description: str, _total: int) -> AbstractContextManager[Progress]:
    return contextlib.nullcontext(lambda _count: None)


@dataclass(frozen=True)
class StoreResult:
    record: VersionRecord
    uploaded: bool


@dataclass(frozen=True)
class LoadResult:
    model_name: str
    commit_hash: str
    path: Path
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class RollbackResult:
    model_name: str
    from_commit: str
    to_commit: str


@dataclass(frozen=True)
class VerifyResult:
    """How one recorded version compares with the bytes the store holds."""

    record: VersionRecord
    status: str  # "ok" | "missing" | "mismatch"
    detail: str = ""


def _utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_metrics(metrics: dict[str, float]) -> dict[str, float]:
    for name, value in metrics.items():
        if not name or not isinstance(value, int | float) or not math.isfinite(value):
            raise UsageError(f"metric {name!r}: give a name and a finite number, like acc=0.93")
    return dict(metrics)


class Project:
    """One `.nexus_meta.json`, its `.nexusrc`, and the store they point to."""

    def __init__(
        self, meta_path: Path, config_path: Path | None = None, *, environ: dict | None = None
    ) -> None:
        self.meta_path = Path(meta_path).absolute()
        self.config_path = Path(config_path or self.meta_path.parent / CONFIG_FILENAME).absolute()
        self._environ = environ

    @classmethod
    def open(
        cls,
        meta: Path | str | None = None,
        config: Path | str | None = None,
        *,
        cwd: Path | None = None,
    ) -> Project:
        """Find the project: ``meta`` if given, else `.nexus_meta.json` at the git root."""
        if meta is None:
            meta = GitRepo.discover(cwd).root / META_FILENAME
        project = cls(Path(meta), Path(config) if config else None)
        _ = project.config  # a bad or secret-holding .nexusrc is refused by every command
        return project

    @cached_property
    def config(self) -> StorageConfig:
        return load_config(self.config_path, self._environ)

    @cached_property
    def store_backend(self) -> ObjectStore:
        return open_store(self.config, self.meta_path.parent)

    def metadata(self) -> Metadata:
        return Metadata.read(self.meta_path)

    # store -----------------------------------------------------------------------------

    def store(
        self,
        file: Path | str,
        model_name: str,
        *,
        message: str = "",
        metrics: dict[str, float] | None = None,
        signature: dict | None = None,
        allow_dirty: bool = False,
        force: bool = False,
        make_latest: bool = True,
        progress: ProgressReporter = silent_progress,
    ) -> StoreResult:
        """Upload ``file`` as the version of ``model_name`` at the current commit."""
        validate_model_name(model_name)
        metrics = _check_metrics(metrics or {})
        signature = validate_signature(signature) if signature is not None else None
        source = Path(file)
        if not source.is_file():
            raise UsageError(f"{source} is not a file")

        repo = GitRepo.discover(self.meta_path.parent)
        commit = repo.head_commit()
        if not allow_dirty:
            dirty = repo.dirty_paths({self.meta_path})
            if dirty:
                shown = ", ".join(dirty[:5]) + (
                    f" and {len(dirty) - 5} more" if len(dirty) > 5 else ""
                )
                raise GitError(
                    f"the working tree has uncommitted changes: {shown}",
                    hint="commit or stash them so the weights match a commit, or use --allow-dirty",
                )

        key = storage_key(model_name, commit, file_extension(source.name))
        self._refuse_other_object(self.metadata(), model_name, commit, key, force)
        uploaded, digest = self._upload(source, key, force, progress)

        record = VersionRecord(
            commit_hash=commit,
            model_name=model_name,
            storage_uri=key,
            sha256=digest.sha256,
            size_bytes=digest.size,
            format=detect_format(source),
            signature=signature,
            created_at=_utc_now(),
            created_by=repo.identity(),
            message=message,
            metrics=metrics,
        )
        with edit_metadata(self.meta_path) as metadata:
            self._refuse_other_object(metadata, model_name, commit, key, force)
            existing = metadata.get(model_name, commit)
            if existing is not None and existing.sha256 == record.sha256:
                record.created_at, record.created_by = existing.created_at, existing.created_by
                record.message = message or existing.message
                record.metrics = metrics or existing.metrics
                record.signature = signature or existing.signature
            metadata.put(record, make_latest=make_latest)
        return StoreResult(record, uploaded)

    @staticmethod
    def _refuse_other_object(
        metadata: Metadata, model: str, commit: str, key: str, force: bool
    ) -> None:
        existing = metadata.get(model, commit)
        if existing is not None and existing.storage_uri != key and not force:
            raise ConflictError(
                f"{model} already has a version at commit {commit[:7]}, stored as "
                f"{existing.storage_uri}",
                hint="pass --force to replace it",
            )

    def _upload(
        self, source: Path, key: str, force: bool, progress: ProgressReporter
    ) -> tuple[bool, Digest]:
        """Put ``source`` at ``key`` unless the same bytes are there; (uploaded, digest)."""
        store = self.store_backend
        size = source.stat().st_size
        info = store.stat(key)
        if info is None:
            try:
                with progress(f"uploading {source.name}", size) as advance:
                    return True, store.put_file(source, key, if_absent=not force, progress=advance)
            except ObjectExistsError as exc:  # another writer finished first
                ours = exc.digest
        else:
            with progress(f"hashing {source.name}", size) as advance:
                ours = hash_file(source, advance)
        if self._stored_matches(key, ours, progress):
            return False, ours
        if not force:
            raise ConflictError(
                f"different bytes are already stored at {key} in {store.describe()}",
                hint="a version is tied to a commit: commit first, or pass --force to replace it",
            )
        with progress(f"uploading {source.name}", size) as advance:
            return True, store.put_file(source, key, if_absent=False, progress=advance)

    def _stored_matches(self, key: str, ours: Digest, progress: ProgressReporter) -> bool:
        """Whether the object at ``key`` holds exactly the bytes ``ours`` describes.

        A record of this very key with the same size vouches for the stored bytes (as in
        DVC; `nexus verify` re-reads them); otherwise the store's bytes are hashed.
        """
        store = self.store_backend
        info = store.stat(key)
        if info is None:
            return False
        if info.size != ours.size:
            return False
        recorded = next(
            (
                v
                for versions in self.metadata().models.values()
                for v in versions
                if v.storage_uri == key
            ),
            None,
        )
        if recorded is not None and recorded.size_bytes == info.size and not info.sha256:
            return recorded.sha256 == ours.sha256
        with progress(f"checking stored {key}", info.size) as advance:
            return store.content_digest(key, progress=advance) == ours

    # list / load / rollback / verify --------------------------------------------------------

    def list_versions(self, model_name: str | None = None) -> list[VersionRecord]:
        """Versions newest first: one model's, or every model's (by model name)."""
        metadata = self.metadata()
        names = [model_name] if model_name is not None else sorted(metadata.models)
        return [v for name in names for v in reversed(metadata.versions(name))]

    def resolve(self, model_name: str, commit: str | None = None) -> VersionRecord:
        """The latest version of ``model_name``, or the one at ``commit`` (a prefix will do)."""
        metadata = self.metadata()
        return metadata.find(model_name, commit) if commit else metadata.latest(model_name)

    def load(
        self,
        model_name: str,
        *,
        commit: str | None = None,
        output: Path | str | None = None,
        progress: ProgressReporter = silent_progress,
    ) -> LoadResult:
        """Download a version; the file appears only once its size and sha256 match."""
        record = self.resolve(model_name, commit)
        default_name = f"{record.model_name}-{record.short_commit}{Path(record.storage_uri).suffix}"
        target = Path(output) if output else Path.cwd() / default_name
        if target.is_dir():
            target = target / default_name
        self.fetch(record, target, progress=progress)
        return LoadResult(
            record.model_name,
            record.commit_hash,
            target.absolute(),
            record.sha256,
            record.size_bytes,
        )

    def fetch(
        self, record: VersionRecord, target: Path, *, progress: ProgressReporter = silent_progress
    ) -> Path:
        """Download exactly the bytes ``record`` describes to ``target`` (verified, atomic)."""
        expected = Digest(record.sha256, record.size_bytes)
        with progress(
            f"downloading {record.model_name}@{record.short_commit}", expected.size
        ) as advance:
            self.store_backend.get_file(record.storage_uri, target, expected, progress=advance)
        return target

    def rollback(self, model_name: str, *, to: str | None = None) -> RollbackResult:
        """Make the version before the latest (or the one at ``to``) the latest."""
        validate_model_name(model_name)
        with edit_metadata(self.meta_path) as metadata:
            versions = metadata.versions(model_name)
            current = metadata.latest(model_name)
            if to is not None:
                target = metadata.find(model_name, to)
            else:
                index = versions.index(current)
                if index == 0:
                    raise NotFoundError(
                        f"{model_name}@{current.short_commit} is its first version; "
                        "there is nothing before it to roll back to"
                    )
                target = versions[index - 1]
            if not self.store_backend.exists(target.storage_uri):
                raise NotFoundError(
                    f"cannot roll back to {model_name}@{target.short_commit}: its object "
                    f"{target.storage_uri} is missing from {self.store_backend.describe()}"
                )
            metadata.set_latest(model_name, target.commit_hash)
        return RollbackResult(model_name, current.commit_hash, target.commit_hash)

    def verify(
        self, model_name: str | None = None, *, progress: ProgressReporter = silent_progress
    ) -> list[VerifyResult]:
        """Compare every recorded version with the bytes the store holds."""
        store = self.store_backend
        results = []
        for record in self.list_versions(model_name):
            info = store.stat(record.storage_uri)
            if info is None:
                results.append(VerifyResult(record, "missing", "object not found in the store"))
                continue
            if info.size != record.size_bytes:
                detail = f"size {info.size} bytes, recorded {record.size_bytes}"
                results.append(VerifyResult(record, "mismatch", detail))
                continue
            with progress(
                f"verifying {record.model_name}@{record.short_commit}", info.size
            ) as advance:
                try:
                    actual = store.content_digest(record.storage_uri, progress=advance)
                except NotFoundError:
                    results.append(VerifyResult(record, "missing", "object vanished while read"))
                    continue
            if actual.sha256 != record.sha256:
                detail = f"sha256 {actual.sha256[:12]}…, recorded {record.sha256[:12]}…"
                results.append(VerifyResult(record, "mismatch", detail))
            else:
                results.append(VerifyResult(record, "ok"))
        return results


def init_project(
    directory: Path,
    config: StorageConfig,
    *,
    force: bool = False,
    meta_path: Path | None = None,
    config_path: Path | None = None,
) -> tuple[Path, Path]:
    """Write `.nexusrc` and an empty `.nexus_meta.json` (kept if it exists) in ``directory``."""
    meta_path = meta_path or directory / META_FILENAME
    config_path = config_path or meta_path.parent / CONFIG_FILENAME
    if config_path.exists() and not force:
        raise UsageError(f"{config_path} already exists", hint="pass --force to overwrite it")
    atomic_write_text(config_path, render_config(config))
    if not meta_path.exists():
        Metadata().write(meta_path)
    else:
        Metadata.read(meta_path)  # an existing registry is kept, but must be valid
    if config.provider == "local":
        make_ignored_dir((meta_path.parent / config.path).resolve())
    return config_path, meta_path
