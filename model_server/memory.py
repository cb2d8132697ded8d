"""The server's memory: the hot path reuses it, the big frees give it back to the OS.

glibc's malloc keeps its adaptive mmap threshold here, so the hot path's buffers (the
JSON parser's, about 12 times the body; a forward pass's activations) stay in the heap
and each request reuses them instead of faulting fresh pages in. The CLI's fixed 1 MiB
threshold (``nexus_cli.transfer.release_freed_buffers_early``) cost the server ~420
page faults and ~0.45 ms of decoding per 32-sample request, measured side by side.

The price is that freed blocks stay in the heap until it is trimmed. Two things let a
trim reach them. Every thread allocates from the one main arena: ``malloc_trim`` does
not shrink the top of a thread's own arena, where each download thread's last 8 MiB
part stayed (64 MB after a 64 MB download). And the server trims when it has just
dropped a lot: after a download, when swapped-out weights are finally freed, and after
a failed load.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import sys
import weakref
from collections.abc import Callable, Mapping

import torch

#: glibc's mallopt parameter for the most arenas malloc may create
M_ARENA_MAX = -8


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (what ``mallopt`` and ``malloc_trim`` need), else
    None: other systems and C libraries keep their own ways."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def one_malloc_arena(environ: Mapping[str, str]) -> bool:
    """Have every thread allocate from malloc's main arena (``M_ARENA_MAX`` = 1), unless
    the operator chose a number of arenas (``MALLOC_ARENA_MAX`` or ``GLIBC_TUNABLES``).
    Whether it was set."""
    chosen = "MALLOC_ARENA_MAX" in environ or "arena_max" in environ.get("GLIBC_TUNABLES", "")
    libc = _glibc()
    if chosen or libc is None:
        return False
    return libc.mallopt(M_ARENA_MAX, 1) == 1


def return_free_memory() -> None:
    """Give the free pages of every malloc arena back to the OS (``malloc_trim``), and
    the CUDA caching allocator's unused blocks back to the device."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def return_memory_when_freed(owner: object, loop: asyncio.AbstractEventLoop) -> Callable[[], bool]:
    """Return free memory once ``owner`` (swapped-out weights) is deallocated; a function
    that says whether ``owner`` is still alive.

    That is not always at the swap: a request still running on the old model holds it
    until the request ends. The finalizer runs in the middle of the deallocation, before
    the weights are freed, so it only asks ``loop`` to trim later, on a worker thread.
    When ``owner`` cannot be watched, that is done at once, and it counts as alive.
    """

    def on_freed() -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the process is ending
            loop.call_soon_threadsafe(_trim_off_the_loop, loop)

    try:
        finalizer = weakref.finalize(owner, on_freed)
    except TypeError:
        on_freed()
        return lambda: True
    finalizer.atexit = False  # an exiting process gives everything back anyway
    return lambda: finalizer.alive


def _trim_off_the_loop(loop: asyncio.AbstractEventLoop) -> None:
    with contextlib.suppress(RuntimeError):  # the executor has shut down: the server stops
        loop.run_in_executor(None, return_free_memory)
