"""Moving bytes while hashing them: every file is read once, and hashing overlaps the I/O.

``hashlib`` and file writes both release the GIL on large buffers, so a single helper
thread that hashes chunk N while the caller writes or uploads chunk N+1 keeps two
cores busy without any copy of the data.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import itertools
import os
import stat
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, Queue
from typing import Any, BinaryIO, TypeVar

from nexus_cli.errors import IntegrityError, UsageError
from nexus_cli.files import temp_path_beside

CHUNK_SIZE = 8 * 1024 * 1024
#: chunks a StreamHasher lets wait for the hashing thread
HASH_DEPTH = 3
#: bytes the kernel copies per copy_file_range call before the hasher is told about them
COPY_STEP = 16 * 1024 * 1024
#: copy_file_range cannot copy between these two files: copy through user space instead
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF}
Progress = Callable[[int], None]


def release_freed_buffers_early() -> None:
    """Have glibc return freed multi-MiB transfer buffers to the OS at once.

    Parallel part transfers free 8-16 MiB buffers on several threads; glibc's adaptive
    mmap threshold would keep them in per-thread heaps, lifting the peak RSS of a 1 GiB
    transfer past 300 MB. A fixed 1 MiB threshold maps large buffers and unmaps them on
    free. A no-op where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 1024 * 1024)  # M_MMAP_THRESHOLD


def no_progress(_: int) -> None:
    """The progress callback that reports nowhere."""


@dataclass(frozen=True)
class Digest:
    """What a pass over some bytes found: their sha256 and their count."""

    sha256: str
    size: int


class SourceFile:
    """The file a user asked to store, open for reading.

    Failing to open or read it is a problem with a path the user named (``UsageError``,
    exit 2, naming the path), never the store's: a backend reads its input only through
    this class, so it can tell the two apart.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._handle = open(path, "rb")  # noqa: SIM115 - closed in close()
        except OSError as exc:
            raise self._error(exc) from exc
        try:
            info = os.fstat(self._handle.fileno())
        except OSError as exc:
            self._handle.close()
            raise self._error(exc) from exc
        self.size = info.st_size
        #: a regular file (not a pipe or a device): the kernel can copy it
        self.is_regular = stat.S_ISREG(info.st_mode)

    def _error(self, exc: OSError) -> UsageError:
        reason = exc.strerror or str(exc)
        return UsageError(f"cannot read {self.path}: {reason}")

    def read(self, size: int = -1) -> bytes:
        try:
            return self._handle.read(size)
        except OSError as exc:
            raise self._error(exc) from exc

    def readinto(self, buffer: bytearray | memoryview) -> int:
        try:
            return self._handle.readinto(buffer)
        except OSError as exc:
            raise self._error(exc) from exc

    def fileno(self) -> int:
        return self._handle.fileno()

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> SourceFile:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class StreamHasher:
    """Hashes chunks in order on a helper thread; at most ``depth`` chunks wait.

    Chunks must be immutable (``bytes``) or left untouched until ``digest()`` returns.
    """

    def __init__(self, depth: int = HASH_DEPTH) -> None:
        self._hash = hashlib.sha256()
        self._size = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nexus-hash")
        self._pending: list[Future] = []
        self._depth = depth

    def update(self, chunk: bytes | memoryview) -> None:
        self._size += len(chunk)
        self._pending.append(self._pool.submit(self._hash.update, chunk))
        while len(self._pending) > self._depth:
            self._pending.pop(0).result()

    def digest(self) -> Digest:
        for future in self._pending:
            future.result()
        self._pending.clear()
        self._pool.shutdown(wait=True)
        return Digest(self._hash.hexdigest(), self._size)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def read_chunks(handle: BinaryIO, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """Yield fresh ``bytes`` chunks of ``handle`` until its end."""
    while chunk := handle.read(chunk_size):
        yield chunk


def reused_chunks(handle: BinaryIO, depth: int = HASH_DEPTH) -> Iterator[memoryview]:
    """Read ``handle`` into a ring of ``depth + 2`` reused buffers, one view at a time.

    A fresh 8 MiB ``bytes`` per chunk costs page faults and zeroing on every read (a
    plain Python copy of 1 GiB took 2-3 times as long as ``cp`` here); reused buffers
    don't. A view stays valid until ``depth + 1`` newer ones are taken, which is what a
    ``StreamHasher(depth)`` plus a synchronous write needs. Not for a consumer that keeps
    chunks longer.
    """
    ring = [bytearray(CHUNK_SIZE) for _ in range(depth + 2)]
    for turn in itertools.count():
        buffer = ring[turn % len(ring)]
        count = handle.readinto(buffer)
        if not count:
            return
        yield memoryview(buffer)[:count]


def hash_file(path: Path, progress: Progress = no_progress) -> Digest:
    """sha256 and size of ``path`` in one read, with one reused buffer."""
    digest = hashlib.sha256()
    size = 0
    buffer = bytearray(CHUNK_SIZE)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            digest.update(view[:count])
            size += count
            progress(count)
    return Digest(digest.hexdigest(), size)


def hash_stream(chunks: Iterator[bytes], progress: Progress = no_progress) -> Digest:
    """sha256 and size of the bytes ``chunks`` yields."""
    hasher = StreamHasher()
    try:
        for chunk in chunks:
            hasher.update(chunk)
            progress(len(chunk))
        return hasher.digest()
    finally:
        hasher.close()


def copy_file_hashed(
    source: BinaryIO | SourceFile, target: BinaryIO, progress: Progress = no_progress
) -> Digest:
    """Copy ``source`` to ``target`` (both at offset 0) and return the digest of the copy.

    ``target`` must be open for reading too (``"x+b"``): the hasher reads it back.

    The kernel copies (``copy_file_range``: no bytes cross into Python, and a filesystem
    that can share extents does so) while one helper thread hashes what has landed in
    ``target``, from the page cache: the digest is of the bytes that were written, not
    of a second read of the source. Where the kernel cannot copy between the two files
    (a pipe, another filesystem, an OS without the call), it is a buffered copy.
    """
    regular = getattr(source, "is_regular", None)
    if regular is None:
        regular = stat.S_ISREG(os.fstat(source.fileno()).st_mode)
    if not regular or not hasattr(os, "copy_file_range"):
        return copy_hashed(source, target, progress)
    target.flush()
    src, dst = source.fileno(), target.fileno()
    try:
        copied = os.copy_file_range(src, dst, COPY_STEP, 0, 0)
    except OSError as exc:
        if exc.errno not in _NO_KERNEL_COPY:
            raise
        return copy_hashed(source, target, progress)
    follower = _CopyHasher(dst)
    try:
        offset = 0
        while copied:
            follower.hash_range(offset, copied)
            progress(copied)
            offset += copied
            copied = os.copy_file_range(src, dst, COPY_STEP, offset, offset)
        os.lseek(dst, offset, os.SEEK_SET)
        return follower.digest()
    finally:
        follower.close()


class _CopyHasher:
    """Hashes ranges of a file, in order, on one helper thread, as a copy lands them."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._hash = hashlib.sha256()
        self._size = 0
        self._buffer = bytearray(CHUNK_SIZE)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nexus-hash")
        self._pending: deque[Future] = deque()

    def _hash_range(self, offset: int, count: int) -> None:
        view = memoryview(self._buffer)
        end = offset + count
        while offset < end:
            got = os.preadv(self._fd, [view[: min(CHUNK_SIZE, end - offset)]], offset)
            if not got:
                raise OSError(errno.EIO, "the copy is shorter than the kernel reported")
            self._hash.update(view[:got])
            offset += got

    def hash_range(self, offset: int, count: int) -> None:
        self._size += count
        self._pending.append(self._pool.submit(self._hash_range, offset, count))
        while len(self._pending) > HASH_DEPTH:
            self._pending.popleft().result()

    def digest(self) -> Digest:
        while self._pending:
            self._pending.popleft().result()
        return Digest(self._hash.hexdigest(), self._size)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def copy_hashed(source: BinaryIO, target: BinaryIO, progress: Progress = no_progress) -> Digest:
    """Copy ``source`` to ``target`` through reused buffers; the digest of what was copied."""
    hasher = StreamHasher()
    try:
        for chunk in reused_chunks(source):
            hasher.update(chunk)
            target.write(chunk)
            progress(len(chunk))
        return hasher.digest()
    finally:
        hasher.close()


# parts: cloud backends move large files as parts, in parallel, hashed in order ------

T = TypeVar("T")
R = TypeVar("R")


def ordered_parallel(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """Run ``fn(item)`` for each item on ``workers`` threads and yield the results in order.

    Items are pulled lazily, at most ``workers + 1`` ahead of the result being waited
    for, which bounds memory. When the consumer stops early (an error, Ctrl-C, a
    ``close()``), calls not yet started are cancelled and running ones are waited for, so
    nothing is still in flight once this generator is closed.
    """
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nexus-part")
    window: deque[Future[R]] = deque()
    try:
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) > workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def unordered_parallel(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """Run ``fn(item)`` for each item on ``workers`` threads; yield results as they finish.

    Like ``ordered_parallel`` (lazy, at most ``workers + 1`` items pulled ahead, nothing
    left running once closed), but a slow call holds up only itself: the next item is
    started as soon as any call finishes. For uploads, whose parts may land in any order.
    """
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nexus-part")
    running: set[Future[R]] = set()
    try:
        for item in items:
            running.add(pool.submit(fn, item))
            if len(running) > workers:
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        while running:
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class Part:
    """One part of a file on its way up: ``data`` is valid until ``release()``."""

    number: int
    data: bytes | bytearray
    release: Callable[[], None]


def pooled_parts(
    reader: BinaryIO | SourceFile, part_size: int, buffers: int, sha256: Any
) -> Iterator[Part]:
    """The parts of ``reader`` in order, from 1, read into ``buffers`` reused buffers.

    Each part is hashed into ``sha256`` (a ``hashlib`` object) as it is read, on the
    caller's thread (hashlib lets go of the GIL, so senders keep running). Reading waits
    for a released buffer: memory stays at ``buffers * part_size``, and no buffer is
    allocated (or page-faulted in) twice. The caller must release every part it takes,
    and take at most ``buffers - 1`` ahead of the releases, or reading waits forever.
    """
    free: Queue[bytearray] = Queue()
    made = 0
    for number in itertools.count(1):
        try:
            buffer = free.get_nowait()
        except Empty:  # made only when needed: a file of three parts holds three buffers
            if made < buffers:
                buffer, made = bytearray(part_size), made + 1
            else:
                buffer = free.get()
        view = memoryview(buffer)
        count = 0
        while count < part_size and (got := reader.readinto(view[count:])):
            count += got
        if not count:
            return
        sha256.update(view[:count])
        # a short last part goes as a copy of its bytes; the buffer is free at once
        data: bytes | bytearray = buffer if count == part_size else bytes(view[:count])
        if data is not buffer:
            free.put(buffer)
        yield Part(number, data, (lambda b=buffer: free.put(b)) if data is buffer else _noop)
        if count < part_size:
            return


def _noop() -> None:
    pass


def read_hashed(handle: BinaryIO | SourceFile) -> tuple[bytes, Digest]:
    """The whole of ``handle`` (a small file) and its digest, from one read."""
    hasher = StreamHasher()
    chunks = []
    try:
        for chunk in read_chunks(handle):
            hasher.update(chunk)
            chunks.append(chunk)
        return b"".join(chunks), hasher.digest()
    finally:
        hasher.close()


def byte_ranges(size: int, part_size: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` pairs, end exclusive, that cover ``size`` bytes in order."""
    for start in range(0, size, part_size):
        yield start, min(start + part_size, size)


class VerifiedSink:
    """A write-only file that becomes ``target`` only if its bytes match what is expected.

    Bytes go to a hidden temp file beside ``target`` and are hashed as they arrive;
    ``commit()`` checks size and sha256 and renames into place, anything else removes
    the temp file, so no partial or wrong file ever appears at ``target``.

    Unlike a store write, a download is not fsynced: it can always be fetched again, and
    whatever trusts it (the model server's cache) verifies it before use. An fsync here
    would make every `nexus load` wait for the disk.
    """

    def __init__(self, target: Path, expected: Digest, *, source: str | None = None) -> None:
        """``source`` names what is downloaded (``key in s3://bucket``) in integrity errors."""
        self.target = target
        self.expected = expected
        self.source = source or target.name
        target.parent.mkdir(parents=True, exist_ok=True)
        self.temp = temp_path_beside(target)
        self._handle = open(self.temp, "x+b")  # noqa: SIM115 - closed in commit/discard
        self._hasher = StreamHasher()
        self._copied: Digest | None = None

    def write(self, chunk: bytes | memoryview) -> int:
        self._hasher.update(chunk)
        return self._handle.write(chunk)

    def copy_from(self, source: BinaryIO, progress: Progress = no_progress) -> None:
        """Fill the sink from a whole local file, by the kernel where it can (nothing
        may have been written before)."""
        self._copied = copy_file_hashed(source, self._handle, progress)

    def commit(self) -> Digest:
        try:
            actual = self._copied or self._hasher.digest()
            if actual.size != self.expected.size:
                raise IntegrityError(
                    f"size mismatch for {self.source}: expected {self.expected.size} bytes, "
                    f"got {actual.size}"
                )
            if actual.sha256 != self.expected.sha256:
                raise IntegrityError(
                    f"sha256 mismatch for {self.source}: expected {self.expected.sha256}, "
                    f"got {actual.sha256}"
                )
            self._handle.close()
            os.replace(self.temp, self.target)
            return actual
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        self._hasher.close()
        self._handle.close()
        self.temp.unlink(missing_ok=True)

    def __enter__(self) -> VerifiedSink:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()
