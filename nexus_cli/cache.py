"""A local cache of verified weights, keyed by sha256, shared safely between processes.

    path = fetch_cached(project, record)      # downloads on a miss, re-checks on a hit

Files are named ``<sha256><ext>`` (``ext`` from the stored key, so tools that look at
suffixes still work) in ``$NEXUS_CACHE_DIR``, else ``$XDG_CACHE_HOME/nexusml``, else
``~/.cache/nexusml``. A file is only ever put there by ``Project.fetch`` (a temp file
checked for size and sha256, then renamed), so a reader sees a whole file or none, even
with several processes sharing the folder.

A hit is checked against the record's size and sha256 before it is used. Re-hashing a
large file on every restart would cost seconds, so after a file has been verified the
cache writes a small sidecar (``.<name>.verified``) with the file's size, inode, mtime
and ctime; a later hit whose stat still matches the sidecar is trusted without re-reading
the bytes. Any change to the file (a write, a touch, a replacement) changes its ctime,
which nobody can set by hand, so a changed file is always re-hashed.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from nexus_cli.files import atomic_write_text, exclusive_lock
from nexus_cli.transfer import hash_file

if TYPE_CHECKING:
    from nexus_cli.api import ProgressReporter, Project
    from nexus_cli.metadata import VersionRecord

CACHE_ENV = "NEXUS_CACHE_DIR"
_SIDECAR_SUFFIX = ".verified"


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$NEXUS_CACHE_DIR``, else ``$XDG_CACHE_HOME/nexusml``, else ``~/.cache/nexusml``."""
    environ = os.environ if environ is None else environ
    if environ.get(CACHE_ENV):
        return Path(environ[CACHE_ENV]).expanduser()
    if environ.get("XDG_CACHE_HOME"):
        return Path(environ["XDG_CACHE_HOME"]).expanduser() / "nexusml"
    return Path.home() / ".cache" / "nexusml"


def cache_path(record: VersionRecord, cache_dir: Path) -> Path:
    """Where ``record``'s bytes live in ``cache_dir``: ``<sha256><ext>``."""
    return cache_dir / f"{record.sha256}{Path(record.storage_uri).suffix}"


@dataclass(frozen=True)
class _Stamp:
    """What the file system says about a file; any change to the file changes it."""

    size: int
    inode: int
    device: int
    mtime_ns: int
    ctime_ns: int
    mode: int = field(default=0, compare=False)  # not in the sidecar: it is no proof

    @classmethod
    def of(cls, path: Path) -> _Stamp:
        info = path.stat()
        return cls(
            info.st_size, info.st_ino, info.st_dev, info.st_mtime_ns, info.st_ctime_ns,
            info.st_mode,
        )  # fmt: skip

    def record(self) -> dict[str, int]:
        """What the sidecar keeps."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.compare}


def _sidecar(path: Path) -> Path:
    return path.with_name(f".{path.name}{_SIDECAR_SUFFIX}")


def _stamp_vouches(path: Path, stamp: _Stamp, sha256: str) -> bool:
    try:
        recorded = json.loads(_sidecar(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return recorded == {"sha256": sha256, **stamp.record()}


def _write_stamp(path: Path, sha256: str) -> None:
    with contextlib.suppress(OSError):  # the sidecar only saves time; the cache works without
        stamp = {"sha256": sha256, **_Stamp.of(path).record()}
        atomic_write_text(_sidecar(path), json.dumps(stamp))


def _forget_if_unchanged(path: Path, examined: _Stamp) -> None:
    """Remove the bad file that was examined, and its sidecar, unless it was replaced
    meanwhile: hashing takes seconds, in which another process may have renamed a good
    copy into place (removing that one made its server fail to load a file it had)."""
    try:
        if _Stamp.of(path) != examined:
            return
    except FileNotFoundError:
        return
    for stale in (path, _sidecar(path)):
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
            stale.unlink()


def find_cached(record: VersionRecord, cache_dir: Path | None = None) -> Path | None:
    """The cached file holding exactly ``record``'s bytes, or ``None``.

    A file whose size or sha256 differs from the record is removed (it is re-fetched).
    """
    path = cache_path(record, cache_dir or default_cache_dir())
    try:
        stamp = _Stamp.of(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(stamp.mode):  # a FIFO, a device, a folder, or a link to one: a miss
        return None
    if stamp.size == record.size_bytes:
        if _stamp_vouches(path, stamp, record.sha256):
            return path
        if hash_file(path).sha256 == record.sha256:
            _write_stamp(path, record.sha256)
            return path
    _forget_if_unchanged(path, stamp)
    return None


def fetch_cached(
    project: Project,
    record: VersionRecord,
    cache_dir: Path | None = None,
    *,
    progress: ProgressReporter | None = None,
) -> Path:
    """A local path holding exactly ``record``'s bytes: from the cache, else downloaded.

    A miss is a verified ``project.fetch`` into the cache (temp file, checked, renamed).
    A lock file per sha256 makes concurrent callers, in this process or others, download
    once; the others wait and then find the file.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    found = find_cached(record, cache_dir)
    if found is not None:
        return found
    with exclusive_lock(cache_dir / ".locks" / f"{record.sha256}.lock"):
        found = find_cached(record, cache_dir)  # another process may have fetched it
        if found is not None:
            return found
        path = cache_path(record, cache_dir)
        if progress is None:
            project.fetch(record, path)
        else:
            project.fetch(record, path, progress=progress)
        # read-only: a server may map the file, so nothing should write to it in place
        with contextlib.suppress(OSError):
            os.chmod(path, 0o444)
        _write_stamp(path, record.sha256)
        return path
