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
import os
import stat
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from nexus_cli.config import StorageConfig, load_config, render_config
from nexus_cli.errors import (
    ConfigError,
    ConflictError,
    GitError,
    NexusError,
    NotFoundError,
    ObjectExistsError,
    UsageError,
)
from nexus_cli.files import (
    atomic_write_text,
    describe_file_type,
    make_ignored_dir,
    prepare_lock,
    read_regular_file,
    replaceable_target,
)
from nexus_cli.gitrepo import GitRepo, find_worktree_root, holds_tracked_files, worktree_root
from nexus_cli.metadata import (
    Metadata,
    VersionRecord,
    edit_metadata,
    lock_path,
    merge_metadata,
)
from nexus_cli.names import (
    file_extension,
    refuse_control_chars,
    storage_key,
    validate_model_name,
)
from nexus_cli.signature import validate_signature

if TYPE_CHECKING:
    from nexus_cli.storage import ObjectInfo, ObjectStore
    from nexus_cli.storage.base import Leftover
    from nexus_cli.transfer import Digest

#: ``progress(count)`` is told how many more bytes moved (``nexus_cli.transfer.Progress``)
Progress = Callable[[int], None]

META_FILENAME = ".nexus_meta.json"
CONFIG_FILENAME = ".nexusrc"
GITATTRIBUTES_FILENAME = ".gitattributes"
MAX_GITATTRIBUTES_BYTES = 1024 * 1024
#: the oldest `nexus gc --older-than` may reach back
MAX_GC_AGE = timedelta(days=36525)
MERGE_DRIVER_NAME = "nexus-meta"
#: the one command that enables the merge driver `nexus init` declares in .gitattributes
MERGE_DRIVER_SETUP = f'git config merge.{MERGE_DRIVER_NAME}.driver "nexus merge-driver %O %A %B"'

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
class GcResult:
    """What ``Project.gc`` found (and removed, unless ``dry_run``)."""

    leftovers: list[Leftover]
    dry_run: bool

    @property
    def total_bytes(self) -> int:
        return sum(leftover.size or 0 for leftover in self.leftovers)


@dataclass(frozen=True)
class InitResult:
    config_path: Path
    meta_path: Path
    #: the `.gitattributes` init created or extended, ``None`` when it already had the line
    gitattributes_path: Path | None


@dataclass(frozen=True)
class VerifyResult:
    """How one recorded version compares with the bytes the store holds."""

    record: VersionRecord
    status: str  # "ok" | "missing" | "mismatch"
    detail: str = ""


def _utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _refuse_dirty(dirty: list[str]) -> None:
    if dirty:
        shown = ", ".join(dirty[:5]) + (f" and {len(dirty) - 5} more" if len(dirty) > 5 else "")
        raise GitError(
            f"the working tree has uncommitted changes: {shown}",
            hint="commit or stash them so the weights match a commit, or use --allow-dirty",
        )


def _check_metrics(metrics: dict[str, float]) -> dict[str, float]:
    for name, value in metrics.items():
        if not name or not isinstance(value, int | float) or not math.isfinite(value):
            raise UsageError(f"metric {name!r}: give a name and a finite number, like acc=0.93")
        refuse_control_chars(name, f"metric name {name!r}")
    return dict(metrics)


def _check_readable_file(source: Path) -> None:
    """Refuse an input that is not a regular file or cannot be read (exit 2, naming it)."""
    try:  # checked before open(): opening a FIFO would block
        mode = os.stat(source).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise UsageError(f"{source} does not exist") from None
    except OSError as exc:
        raise UsageError(f"cannot read {source}: {exc.strerror}") from exc
    if not stat.S_ISREG(mode):
        raise UsageError(f"{source} is {describe_file_type(mode)}, not a file")
    try:
        with open(source, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise UsageError(f"cannot read {source}: {exc.strerror}") from exc


def _check_output_target(target: Path) -> None:
    """Refuse a download target that must not be replaced or cannot be written, before I/O.

    An existing target must be a regular file: a FIFO, a device (``/dev/null``), a
    symbolic link or a folder is never replaced by the download.
    """
    try:
        mode = os.lstat(target).st_mode
    except (FileNotFoundError, NotADirectoryError):  # a parent that is a file: said below
        mode = stat.S_IFREG
    if not stat.S_ISREG(mode):
        raise UsageError(
            f"refusing to write {target}: it is {describe_file_type(mode)}, "
            "not a regular file (remove it or choose another -o)"
        )
    folder = target.parent
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UsageError(f"cannot write {target}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {target}: {folder} is not writable")


def check_local_store_root(root: Path, meta_dir: Path) -> None:
    """Refuse a local store folder that would hide tracked work from git.

    The store writes a `.gitignore` of ``*`` at its root, so a store at the repository
    root, around the repository, or in a folder git tracks files in would make git
    ignore the user's own files.
    """
    repo = find_worktree_root(meta_dir.resolve())
    if repo is not None and (repo == root or repo.is_relative_to(root)):
        raise ConfigError(
            f"the local store path {root} is the git repository or holds it; "
            "choose a folder of its own, like .nexus/store"
        )
    if ".git" in root.parts:
        raise ConfigError(
            f"the local store path {root} is inside a .git folder, which is git's own; "
            "choose a folder of its own, like .nexus/store"
        )
    inside = find_worktree_root(root)
    if inside is not None and (inside == root or holds_tracked_files(inside, root)):
        raise ConfigError(
            f"the local store path {root} holds files git tracks; "
            "choose a folder of its own, like .nexus/store"
        )


def _recorded_at(metadata: Metadata, key: str) -> VersionRecord | None:
    """The version recorded at object ``key``, if any."""
    return next(
        (v for versions in metadata.models.values() for v in versions if v.storage_uri == key),
        None,
    )


def check_link_in_worktree(path: Path) -> None:
    """Refuse a tracked file (the metadata, `.nexusrc`, `.gitattributes`) that is a link
    leading out of the git work tree holding it, before writing through it.

    Git records a link, not what it points to: what is written through such a link
    never reaches the repository, and a link that arrived by pull request would have
    nexus write (and make folders) wherever it points. A link within the work tree is
    written through.
    """
    if not path.is_symlink():
        return
    root = find_worktree_root(path.parent.resolve())
    target = path.resolve()
    if root is not None and not target.is_relative_to(root):
        raise UsageError(
            f"{path} is a link to {target}, outside the git repository {root}: git "
            "would record the link, not the file; replace the link with the file"
        )


class Project:
    """One `.nexus_meta.json`, its `.nexusrc`, and the store they point to."""

    def __init__(
        self,
        meta_path: Path,
        config_path: Path | None = None,
        *,
        environ: dict | None = None,
        on_wait: Callable[[Path], None] | None = None,
    ) -> None:
        self.meta_path = Path(meta_path).absolute()
        #: a config the caller named must exist; the default one may be missing
        self._config_named = config_path is not None
        self.config_path = Path(config_path or self.meta_path.parent / CONFIG_FILENAME).absolute()
        self._environ = environ
        #: told when another process holds the metadata lock for more than a second
        self.on_wait = on_wait

    @classmethod
    def open(
        cls,
        meta: Path | str | None = None,
        config: Path | str | None = None,
        *,
        cwd: Path | None = None,
        require_meta: bool = False,
        on_wait: Callable[[Path], None] | None = None,
    ) -> Project:
        """Find the project: ``meta`` if given, else `.nexus_meta.json` at the git root.

        A ``config`` given here must exist. With ``require_meta``, so must a ``meta``
        given here (a typo must not read as an empty registry).
        """
        if meta is None:
            meta = worktree_root(cwd) / META_FILENAME
        elif require_meta and not Path(meta).exists():
            raise UsageError(f"metadata file {meta} does not exist")
        project = cls(Path(meta), Path(config) if config else None, on_wait=on_wait)
        _ = project.config  # a bad or secret-holding .nexusrc is refused by every command
        return project

    @cached_property
    def config(self) -> StorageConfig:
        return load_config(self.config_path, self._environ, must_exist=self._config_named)

    @cached_property
    def store_backend(self) -> ObjectStore:
        from nexus_cli.storage import open_store  # imported here: backends load their SDKs

        if self.config.provider == "local":
            check_local_store_root(
                (self.meta_path.parent / self.config.path).resolve(), self.meta_path.parent
            )
        return open_store(self.config, self.meta_path.parent)

    def metadata(self) -> Metadata:
        return Metadata.read(self.meta_path)

    def _edit(self, *, lenient_latest: bool = False) -> AbstractContextManager[Metadata]:
        check_link_in_worktree(self.meta_path)
        return edit_metadata(self.meta_path, lenient_latest=lenient_latest, on_wait=self.on_wait)

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
        refuse_control_chars(message, "the message")
        metrics = _check_metrics(metrics or {})
        signature = validate_signature(signature) if signature is not None else None
        source = Path(file)
        _check_readable_file(source)

        from nexus_cli.formats import detect_format

        with GitRepo.start(self.meta_path.parent) as repo:
            # git answers while the storage SDK loads (they cost about the same); git's
            # complaints still come first
            store_error = None
            try:
                self.store_backend  # noqa: B018 - opened here for the overlap
            except NexusError as exc:
                store_error = exc
            commit = repo.head_commit()
            if not allow_dirty:
                _refuse_dirty(repo.dirty_paths({self.meta_path}))
            created_by = repo.identity()
        if store_error is not None:
            raise store_error

        # before the upload: a registry that cannot be written could not record it
        check_link_in_worktree(self.meta_path)
        prepare_lock(lock_path(self.meta_path))
        file_format = detect_format(source)  # before the upload: nothing fails after it
        key = storage_key(model_name, commit, file_extension(source.name))
        before = self.metadata()
        self._refuse_other_object(before, model_name, commit, key, force)
        uploaded, digest = self._upload(source, key, before, force, progress)

        record = VersionRecord(
            commit_hash=commit,
            model_name=model_name,
            storage_uri=key,
            sha256=digest.sha256,
            size_bytes=digest.size,
            format=file_format,
            signature=signature,
            created_at=_utc_now(),
            created_by=created_by,
            message=message,
            metrics=metrics,
        )
        try:
            with self._edit() as metadata:
                self._refuse_other_object(metadata, model_name, commit, key, force)
                existing = metadata.get(model_name, commit)
                if existing is not None and existing.sha256 == record.sha256:
                    record.created_at = existing.created_at
                    record.created_by = existing.created_by
                    record.message = message or existing.message
                    record.metrics = metrics or existing.metrics
                    record.signature = signature or existing.signature
                metadata.put(record, make_latest=make_latest)
        except OSError as exc:
            raise UsageError(
                f"cannot write the metadata {self.meta_path} ({exc.strerror}: "
                f"{exc.filename or self.meta_path}); the object IS uploaded to "
                f"{self.store_backend.describe()}/{key}, so running the same command again "
                "once the folder is writable records it without uploading again"
            ) from exc
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
        self, source: Path, key: str, metadata: Metadata, force: bool, progress: ProgressReporter
    ) -> tuple[bool, Digest]:
        """Put ``source`` at ``key`` unless the same bytes are there; (uploaded, digest)."""
        from nexus_cli.transfer import hash_file

        store = self.store_backend
        size = source.stat().st_size
        info = store.stat(key)
        if info is None:
            try:
                with progress(f"uploading {source.name}", size) as advance:
                    return True, store.put_file(source, key, if_absent=not force, progress=advance)
            except ObjectExistsError as exc:  # another writer finished first
                ours = exc.digest
            info = store.stat(key)
        else:
            with progress(f"hashing {source.name}", size) as advance:
                ours = hash_file(source, advance)
        recorded = None if force else _recorded_at(metadata, key)
        if info is not None and self._stored_matches(info, ours, recorded, progress):
            return False, ours
        if not force:
            raise ConflictError(
                f"different bytes are already stored at {key} in {store.describe()}",
                hint="a version is tied to a commit: commit first, or pass --force to replace it",
            )
        with progress(f"uploading {source.name}", size) as advance:
            return True, store.put_file(source, key, if_absent=False, progress=advance)

    def _stored_matches(
        self,
        info: ObjectInfo,
        ours: Digest,
        recorded: VersionRecord | None,
        progress: ProgressReporter,
    ) -> bool:
        """Whether the object ``info`` describes holds exactly the bytes ``ours`` describes.

        A record of this very key with the same size (``recorded``) vouches for the
        stored bytes (as in DVC; `nexus verify` re-reads them) unless the store computed
        a checksum itself; ``--force`` passes no record, which is how a corrupted object
        gets repaired. Otherwise the store's bytes decide.
        """
        if info.size != ours.size:
            return False
        if info.sha256:  # computed by the store over the bytes it holds
            return info.sha256 == ours.sha256
        if recorded is not None and recorded.size_bytes == info.size:
            return recorded.sha256 == ours.sha256
        with progress(f"checking stored {info.key}", info.size) as advance:
            return self.store_backend.content_digest(info.key, progress=advance) == ours

    # list / load / rollback / verify --------------------------------------------------------

    def list_versions(self, model_name: str | None = None) -> list[VersionRecord]:
        """Versions newest first: one model's, or every model's (by model name)."""
        metadata = self.metadata()
        names = [model_name] if model_name is not None else sorted(metadata.models)
        return [v for name in names for v in reversed(metadata.versions(name))]

    def resolve(self, model_name: str, commit: str | None = None) -> VersionRecord:
        """The latest version of ``model_name``, or the one at ``commit`` (a prefix will do).

        An empty ``commit`` is an error, not "the latest": ``--commit "$SHA"`` with an
        unset variable must not load another model.
        """
        metadata = self.metadata()
        return metadata.latest(model_name) if commit is None else metadata.find(model_name, commit)

    def load(
        self,
        model_name: str,
        *,
        commit: str | None = None,
        output: Path | str | None = None,
        progress: ProgressReporter = silent_progress,
    ) -> LoadResult:
        """Download a version; the file appears only once its size and sha256 match.

        ``output`` may be a folder (the file goes inside under its default name): one
        that exists, or a string ending in a separator (``models/``), created if need be.
        An existing file there that is not a regular file is never replaced.
        """
        record = self.resolve(model_name, commit)
        default_name = f"{record.model_name}-{record.short_commit}{Path(record.storage_uri).suffix}"
        target = Path(output) if output else Path.cwd() / default_name
        names_a_folder = isinstance(output, str) and output.endswith(("/", os.sep))
        if names_a_folder or (target.is_dir() and not target.is_symlink()):
            target = target / default_name
        elif target.is_dir():  # a link to a folder: the folder is what the user means
            target = target.resolve() / default_name
        _check_output_target(target)
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
        from nexus_cli.transfer import Digest

        expected = Digest(record.sha256, record.size_bytes)
        with progress(
            f"downloading {record.model_name}@{record.short_commit}", expected.size
        ) as advance:
            try:
                self.store_backend.get_file(record.storage_uri, target, expected, progress=advance)
            except (ConnectionError, TimeoutError):
                raise  # a backend's network error it did not translate: not the user's path
            except OSError as exc:  # backends translate their own errors: this is the target
                raise UsageError(
                    f"cannot write {exc.filename or target}: {exc.strerror or exc}"
                ) from exc
        return target

    def fetch_cached(
        self,
        record: VersionRecord,
        cache_dir: Path | None = None,
        *,
        progress: ProgressReporter = silent_progress,
    ) -> Path:
        """The verified local copy of ``record`` in the cache (keyed by sha256).

        Fetched on a miss; the model server uses it.
        """
        from nexus_cli.cache import fetch_cached

        return fetch_cached(self, record, cache_dir, progress=progress)

    def rollback(self, model_name: str, *, to: str | None = None) -> RollbackResult:
        """Make the version before the latest (or the one at ``to``) the latest.

        With ``to``, a file whose model has several latest versions (two branches merged
        without the merge driver) is read anyway: naming the one to keep repairs it.
        """
        validate_model_name(model_name)
        with self._edit(lenient_latest=to is not None) as metadata:
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

    # housekeeping -----------------------------------------------------------------------

    def gc(self, older_than: timedelta = timedelta(days=1), *, dry_run: bool = False) -> GcResult:
        """Remove what interrupted uploads left in the store, older than ``older_than``.

        Only in-flight state (incomplete multipart uploads, temporary parts, local
        ``.incomplete`` files) is touched, never a stored version: other branches'
        metadata may name any object, so complete objects are never collected.
        """
        if not timedelta(0) <= older_than <= MAX_GC_AGE:  # a cutoff before year 1 overflows
            raise UsageError(
                f"the age for gc must be between 0 and 100 years, not {older_than.days} days"
            )
        store = self.store_backend
        found = list(store.leftovers(older_than))
        if not dry_run:
            for leftover in found:
                store.remove_leftover(leftover)
        return GcResult(found, dry_run)


def merge_metadata_files(base: Path, ours: Path, theirs: Path) -> Metadata:
    """The git merge driver: merge three versions of a registry and write it to ``ours``.

    Git passes the common ancestor, our side and their side as temporary files (%O %A
    %B) and takes the result from ``ours``. An empty file, or a missing ``base``, is an
    empty registry (a registry added on both branches has no ancestor); a missing side
    is a ``UsageError``. Either side may hold
    several latest versions (a merge made before the driver was set up); the rule in
    ``merge_metadata`` picks one. A real conflict raises ``ConflictError`` and leaves
    ``ours`` as it was.
    """

    def read(path: Path, *, side: bool) -> Metadata:
        if side and not path.exists():  # git always passes both sides: this is a typo
            raise UsageError(f"{path} does not exist")
        if path.exists() and path.stat().st_size == 0:
            return Metadata()
        return Metadata.read(path, lenient_latest=True)

    merged = merge_metadata(read(base, side=False), read(ours, side=True), read(theirs, side=True))
    merged.write(ours)
    return merged


def declare_merge_driver(meta_path: Path) -> Path | None:
    """Add the `.gitattributes` line that routes ``meta_path`` to the nexus merge driver.

    Idempotent: returns the file when it was created or extended, ``None`` when it
    already had the line.
    """
    path = meta_path.parent / GITATTRIBUTES_FILENAME
    line = f"{meta_path.name} merge={MERGE_DRIVER_NAME}"
    try:
        data = read_regular_file(path, MAX_GITATTRIBUTES_BYTES)
    except FileNotFoundError:
        data = b""
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from exc
    if len(data) > MAX_GITATTRIBUTES_BYTES:
        raise UsageError(f"{path} is larger than 1 MiB; add this line by hand: {line}")
    try:
        current = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"cannot read {path}: not UTF-8 text") from exc
    for existing in current.splitlines():
        words = existing.split()
        if words[:1] == [meta_path.name] and f"merge={MERGE_DRIVER_NAME}" in words[1:]:
            return None
    separator = "" if not current or current.endswith("\n") else "\n"
    atomic_write_text(path, f"{current}{separator}{line}\n")
    return path


def init_project(
    directory: Path,
    config: StorageConfig,
    *,
    force: bool = False,
    meta_path: Path | None = None,
    config_path: Path | None = None,
) -> InitResult:
    """Write `.nexusrc`, an empty `.nexus_meta.json` (kept if it exists) and the
    `.gitattributes` line of the merge driver in ``directory``.

    All or nothing: everything that can be refused (an existing `.nexusrc`, an invalid
    existing registry, a store folder inside the tracked tree, a target that is not a
    regular file) is checked before the first write.
    """
    meta_path = meta_path or directory / META_FILENAME
    config_path = config_path or meta_path.parent / CONFIG_FILENAME
    if config_path.exists() and not force:
        raise UsageError(f"{config_path} already exists", hint="pass --force to overwrite it")
    Metadata.read(meta_path)  # an existing registry is kept, but must be valid
    store_root = (meta_path.parent / config.path).resolve()
    if config.provider == "local":
        check_local_store_root(store_root, meta_path.parent)
    for target in (config_path, meta_path, meta_path.parent / GITATTRIBUTES_FILENAME):
        check_link_in_worktree(target)
        replaceable_target(target)
    try:
        atomic_write_text(config_path, render_config(config))
        if not meta_path.exists():
            Metadata().write(meta_path)
        gitattributes = declare_merge_driver(meta_path)
        if config.provider == "local":
            make_ignored_dir(store_root)
    except OSError as exc:
        raise UsageError(f"cannot write {exc.filename or directory}: {exc.strerror}") from exc
    return InitResult(config_path, meta_path, gitattributes)
