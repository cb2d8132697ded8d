"""The local backend: the storage contract plus what only a folder on disk can show."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from nexus_cli import transfer
from nexus_cli.config import StorageConfig
from nexus_cli.errors import StorageError, UsageError
from nexus_cli.files import temp_path_beside
from nexus_cli.storage import notices, open_store
from nexus_cli.storage.base import Leftover
from nexus_cli.storage.local import LocalStore
from tests.storage_contract import StorageContract, digest_of, write


class TestLocalContract(StorageContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> LocalStore:
        return LocalStore(tmp_path / "store")

    def leave_leftover(self, store: LocalStore, tmp_path: Path) -> str:
        temp = temp_path_beside(store.root / "m" / "k.pt")
        temp.write_bytes(b"half a write")
        return temp.relative_to(store.root).as_posix()


def test_open_store_resolves_the_path_beside_the_metadata(tmp_path: Path) -> None:
    store = open_store(StorageConfig(provider="local", path="weights/here"), tmp_path)
    assert isinstance(store, LocalStore)
    assert store.root == (tmp_path / "weights" / "here").resolve()


def test_store_folder_ignores_itself_in_git(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    store.put_file(write(tmp_path, "a", b"x"), "m/k.pt")
    assert (tmp_path / "s" / ".gitignore").read_text().splitlines()[-1] == "*"
    assert [o.key for o in store.list()] == ["m/k.pt"]


def test_list_skips_incomplete_uploads(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    store.put_file(write(tmp_path, "a", b"x"), "m/k.pt")
    (tmp_path / "s" / "m" / ".k2.pt.abc.incomplete").write_bytes(b"partial")
    assert [o.key for o in store.list()] == ["m/k.pt"]


def test_a_killed_write_leaves_no_object_and_can_be_redone(tmp_path: Path) -> None:
    """SIGKILL mid-copy (the source is a pipe we stop feeding): nothing appears at the key."""
    fifo = tmp_path / "source.fifo"
    os.mkfifo(fifo)
    root = tmp_path / "s"
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from nexus_cli.storage.local import LocalStore;"
            "LocalStore(Path(sys.argv[1])).put_file(Path(sys.argv[2]), 'm/k.pt')",
            str(root),
            str(fifo),
        ]
    )
    try:
        with open(fifo, "wb") as feed:
            feed.write(os.urandom(1_000_000))
            feed.flush()
            deadline = time.monotonic() + 30
            while not list((root / "m").glob(".k.pt.*.incomplete")):
                assert time.monotonic() < deadline, "the writer never started"
                time.sleep(0.01)
            writer.send_signal(signal.SIGKILL)
            writer.wait(timeout=30)
    except BrokenPipeError:
        pass
    finally:
        writer.kill()
    assert writer.returncode == -signal.SIGKILL
    store = LocalStore(root)
    assert store.stat("m/k.pt") is None
    assert list(store.list()) == []

    data = os.urandom(2_000_000)
    digest = store.put_file(write(tmp_path, "again", data), "m/k.pt")
    assert digest == digest_of(data)
    assert store.content_digest("m/k.pt") == digest


def test_a_store_root_that_is_a_file_is_a_storage_error(tmp_path: Path) -> None:
    root = tmp_path / "s"
    root.write_text("not a folder")
    with pytest.raises(StorageError, match="cannot write"):
        LocalStore(root).put_file(write(tmp_path, "a", b"x"), "m/k.pt")


def test_a_killed_write_is_a_leftover_and_only_it(tmp_path: Path) -> None:
    """What a killed write leaves is what gc finds; stored objects and the marker never are."""
    store = LocalStore(tmp_path / "s")
    store.put_file(write(tmp_path, "a", b"x"), "m/k.pt")
    stale = temp_path_beside(store.root / "m" / "k2.pt")
    stale.write_bytes(b"partial")
    old = time.time() - 3 * 86400
    os.utime(stale, (old, old))
    fresh = temp_path_beside(store.root / "m" / "k3.pt")
    fresh.write_bytes(b"in flight")
    (store.root / "m" / "notes.incomplete").write_bytes(b"not ours")  # not our temp name
    (leftover,) = store.leftovers(timedelta(days=1))
    assert leftover.name == stale.relative_to(store.root).as_posix()
    assert leftover.size == len(b"partial")
    assert abs(leftover.started_at.timestamp() - old) < 1
    store.remove_leftover(leftover)
    assert not stale.exists()
    assert fresh.exists()
    assert (store.root / "m" / "notes.incomplete").exists()


@pytest.mark.parametrize(
    "leftover",
    [
        Leftover("incomplete_file", "m/k.pt", 1, datetime.now(UTC)),
        Leftover("incomplete_file", "../.k.pt.0123456789ab.incomplete", 1, datetime.now(UTC)),
        Leftover("multipart_upload", "m/.k.pt.0123456789ab.incomplete", 1, datetime.now(UTC)),
    ],
    ids=["stored-object", "outside-the-root", "wrong-kind"],
)
def test_remove_leftover_never_removes_a_stored_object(tmp_path: Path, leftover: Leftover) -> None:
    store = LocalStore(tmp_path / "s")
    store.put_file(write(tmp_path, "a", b"x"), "m/k.pt")
    outside = tmp_path / ".k.pt.0123456789ab.incomplete"
    outside.write_bytes(b"y")
    with pytest.raises((ValueError, UsageError)):
        store.remove_leftover(leftover)
    assert store.stat("m/k.pt") is not None
    assert outside.exists()


# how bytes move ---------------------------------------------------------------------------


def test_the_kernel_copies_while_the_copy_is_hashed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Store and load go through copy_file_range, step by step, with progress per step."""
    monkeypatch.setattr(transfer, "COPY_STEP", 1024 * 1024)
    calls: list[int] = []
    real = os.copy_file_range

    def counting(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(os, "copy_file_range", counting)
    data = os.urandom(3 * 1024 * 1024 + 77)
    store = LocalStore(tmp_path / "s")
    progressed: list[int] = []
    digest = store.put_file(write(tmp_path, "w", data), "m/k.pt", progress=progressed.append)
    assert digest == digest_of(data)
    assert progressed == [1024 * 1024] * 3 + [77]
    assert len(calls) == 5  # four steps with bytes, one that finds the end
    target = tmp_path / "out" / "k.pt"
    assert store.get_file("m/k.pt", target, digest) == digest
    assert target.read_bytes() == data
    assert len(calls) == 10


@pytest.mark.parametrize("how", ["cross-device", "no-such-call"])
def test_without_a_kernel_copy_the_bytes_go_through_buffers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    if how == "no-such-call":  # macOS, Windows
        monkeypatch.delattr(os, "copy_file_range")
    else:

        def refuse(*_args, **_kwargs):
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", refuse)
    data = os.urandom(2 * transfer.CHUNK_SIZE + 5)
    store = LocalStore(tmp_path / "s")
    digest = store.put_file(write(tmp_path, "w", data), "m/k.pt")
    assert digest == digest_of(data)
    target = tmp_path / "out" / "k.pt"
    store.get_file("m/k.pt", target, digest)
    assert target.read_bytes() == data


def test_a_full_disk_mid_copy_is_a_storage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "copy_file_range", full)
    store = LocalStore(tmp_path / "s")
    with pytest.raises(StorageError, match="No space left"):
        store.put_file(write(tmp_path, "w", b"x" * 1000), "m/k.pt")
    assert list(store.leftovers(timedelta(0))) == []  # the temp file went too


# notices ----------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "pipe"])
def test_notices_reach_stderr_only_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, terminal: bool
) -> None:
    """A person at a terminal sees what is retried; a CI log or a --json consumer that
    expects one error line on stderr sees nothing more."""
    stream = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    notices.notice("PutObject on s3://b: the endpoint answered 503;\n retrying (2 of 5)")
    expected = "nexus: PutObject on s3://b: the endpoint answered 503; retrying (2 of 5)\n"
    assert stream.getvalue() == (expected if terminal else "")


@pytest.mark.parametrize(("parts", "expected_buffers"), [(3, 2), (12, 4)])
def test_upload_parts_come_from_a_bounded_set_of_buffers(
    tmp_path: Path, parts: int, expected_buffers: int
) -> None:
    """At most ``buffers`` are made, only as needed (the short last part is a copy);
    each part is hashed as it is read."""
    part_size = 64 * 1024
    data = os.urandom(parts * part_size - 10)
    sha256 = hashlib.sha256()
    seen: list[bytes] = []
    held: list[transfer.Part] = []
    buffers: set[int] = set()
    with open(write(tmp_path, "w", data), "rb") as reader:
        for part in transfer.pooled_parts(reader, part_size, 4, sha256):
            seen.append(bytes(part.data))
            if isinstance(part.data, bytearray):
                buffers.add(id(part.data))
            held.append(part)
            if len(held) == 4:  # every buffer taken: the next part waits for these
                for done in held:
                    done.release()
                held.clear()
    assert b"".join(seen) == data
    assert [len(chunk) for chunk in seen] == [part_size] * (parts - 1) + [part_size - 10]
    assert sha256.hexdigest() == digest_of(data).sha256
    assert len(buffers) == expected_buffers
