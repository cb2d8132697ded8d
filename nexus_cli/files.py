"""Local file plumbing: atomic writes, temp names beside a target, a lock, ignored folders.

Portable: nothing here needs a POSIX-only call (the lock is ``filelock``'s, which uses
``msvcrt`` on Windows and ``fcntl`` elsewhere).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from nexus_cli.errors import UsageError

INCOMPLETE_SUFFIX = ".incomplete"
_TEMP_NAME_RE = re.compile(r"\..+\.[0-9a-f]{12}" + re.escape(INCOMPLETE_SUFFIX))
#: how long a lock is waited for in silence before ``on_wait`` is told
LOCK_NOTICE_AFTER_S = 1.0


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


def describe_file_type(mode: int) -> str:
    """What a non-regular file is, in words: 'a folder', 'a FIFO', ..."""
    kinds = (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((words for test, words in kinds if test(mode)), "not a regular file")


def read_regular_file(path: Path, limit: int) -> bytes:
    """The first ``limit + 1`` bytes of the regular file at ``path`` (a link is followed).

    For files that arrive by pull request (`.nexusrc`, `.nexus_meta.json`): git stores
    symbolic links, so one may point at a FIFO (a reader blocks forever) or at
    ``/dev/zero`` (a reader never ends). The file is opened without blocking and checked
    by its open handle; anything but a regular file is an ``OSError`` whose ``strerror``
    says what it is. A result longer than ``limit`` means the file is larger.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            reason = f"it is {describe_file_type(mode)}, not a regular file"
            raise OSError(errno.EINVAL, reason, str(path))
        with open(fd, "rb", closefd=False) as handle:
            return handle.read(limit + 1)
    finally:
        os.close(fd)


def replaceable_target(path: Path) -> Path:
    """The file an atomic write to ``path`` must replace: ``path``, or a symlink's target.

    A symbolic link is written through: the new file is renamed onto the file the link
    points to, so the link stays a link. Anything that exists and is not a regular file
    (a FIFO, a device, a folder, a link to one of those) is refused with ``UsageError``:
    replacing it with a regular file would break whatever it was.
    """
    target = path.resolve() if path.is_symlink() else path
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return target
    except NotADirectoryError:
        raise UsageError(f"cannot write {path}: a folder on its path is a file") from None
    if not stat.S_ISREG(mode):
        shown = f"{path} (a link to {target})" if target != path else str(path)
        raise UsageError(
            f"refusing to replace {shown}: it is {describe_file_type(mode)}, not a regular file"
        )
    return target


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and a rename: readers see old or new.

    A symbolic link at ``path`` is written through to its target (see
    ``replaceable_target``), the temp file sitting beside that target.
    """
    target = replaceable_target(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path_beside(target)
    try:
        with open(temp, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileNotFoundError):
            os.chmod(temp, target.stat().st_mode & 0o777)
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def make_ignored_dir(directory: Path) -> None:
    """Create ``directory`` holding a `.gitignore` of ``*``: git ignores it and all it holds."""
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / ".gitignore"
    if not marker.exists():
        atomic_write_text(
            marker, "# Created by nexus: weights and scratch files, never committed.\n*\n"
        )


def _lock_error(lock_path: Path, exc: OSError) -> UsageError:
    return UsageError(
        f"cannot take the lock {lock_path} ({exc.strerror}: {exc.filename or lock_path})",
        hint=f"{lock_path.parent} must be a folder this user can write, and the lock in it "
        "a plain file (or absent): remove whatever else is there",
    )


def prepare_lock(lock_path: Path) -> None:
    """Create the git-ignored folder that holds ``lock_path``; ``UsageError`` naming it
    when that is impossible (a file in its place, no permission). A command that will
    take the lock after slow work (an upload) calls this first, to fail before it."""
    try:
        make_ignored_dir(lock_path.parent)
    except OSError as exc:
        raise _lock_error(lock_path, exc) from exc


@contextlib.contextmanager
def exclusive_lock(
    lock_path: Path, *, on_wait: Callable[[Path], None] | None = None
) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (created in a git-ignored folder).

    When another process holds it for longer than ``LOCK_NOTICE_AFTER_S``, ``on_wait``
    is called once (so a person knows why nothing happens), then the wait goes on.
    """
    from filelock import FileLock, Timeout  # imported here: it costs startup time

    prepare_lock(lock_path)
    lock = FileLock(lock_path, thread_local=False)
    try:
        try:
            lock.acquire(timeout=LOCK_NOTICE_AFTER_S)
        except Timeout:
            if on_wait is not None:
                on_wait(lock_path)
            lock.acquire()
    except OSError as exc:
        raise _lock_error(lock_path, exc) from exc
    try:
        yield
    finally:
        lock.release()
