"""Local file plumbing: atomic writes, temp names beside a target, a lock, ignored folders."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

INCOMPLETE_SUFFIX = ".incomplete"
_TEMP_NAME_RE = re.compile(r"\..+\.[0-9a-f]{12}" + re.escape(INCOMPLETE_SUFFIX))


def temp_path_beside(target: Path) -> Path:
    """A unique hidden name in ``target``'s folder, so a rename onto ``target`` is atomic."""
    return target.with_name(f".{target.name}.{secrets.token_hex(6)}{INCOMPLETE_SUFFIX}")


def is_temp_file(path: str | Path) -> bool:
    """Whether ``path`` is named like a file ``temp_path_beside`` made."""
    return bool(_TEMP_NAME_RE.fullmatch(Path(path).name))


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort where directories can't be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and a rename: readers see old or new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path_beside(path)
    try:
        with open(temp, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileNotFoundError):
            os.chmod(temp, path.stat().st_mode & 0o777)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def make_ignored_dir(directory: Path) -> None:
    """Create ``directory`` holding a `.gitignore` of ``*``: git ignores it and all it holds."""
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / ".gitignore"
    if not marker.exists():
        atomic_write_text(
            marker, "# Created by nexus: weights and scratch files, never committed.\n*\n"
        )


@contextlib.contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``lock_path`` (created in a git-ignored folder)."""
    make_ignored_dir(lock_path.parent)
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
