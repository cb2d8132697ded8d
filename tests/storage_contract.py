"""The storage contract: every backend's test module subclasses ``StorageContract``.

A subclass provides a ``store`` fixture that yields an empty ``ObjectStore`` (the
local folder, S3 on a moto server, GCS on an emulator); every test here then runs
against it unchanged.
"""

from __future__ import annotations

import hashlib
import os
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from nexus_cli.errors import (
    IntegrityError,
    NotFoundError,
    ObjectExistsError,
    StorageError,
    UsageError,
)
from nexus_cli.storage import ObjectStore
from nexus_cli.transfer import CHUNK_SIZE, Digest


def digest_of(data: bytes) -> Digest:
    return Digest(hashlib.sha256(data).hexdigest(), len(data))


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def assert_missing_bucket_everywhere(store: ObjectStore, tmp_path: Path, bucket: str) -> None:
    """For cloud stores: every operation on a bucket that does not exist says so (exit 6)."""
    source = write(tmp_path, "a", b"x")
    for action in (
        lambda: store.stat("m/k.pt"),
        lambda: store.put_file(source, "m/k.pt"),
        lambda: list(store.iter_bytes("m/k.pt")),
        lambda: list(store.list()),
        lambda: store.delete("m/k.pt"),
    ):
        with pytest.raises(StorageError, match=f"'{bucket}' does not exist"):
            action()


class StorageContract:
    """Behaviour every backend promises. Subclasses supply the ``store`` fixture."""

    #: a size that crosses the backend's chunk or part boundaries
    large_size = 2 * CHUNK_SIZE + 12345

    @pytest.fixture
    def store(self) -> ObjectStore:  # pragma: no cover - always overridden
        raise NotImplementedError

    def leave_leftover(self, store: ObjectStore, tmp_path: Path) -> str:
        """Leave what a killed `nexus store` leaves; return the leftover's name."""
        raise NotImplementedError  # pragma: no cover - every backend has one

    def test_put_then_get_round_trips_bytes(self, store: ObjectStore, tmp_path: Path) -> None:
        data = os.urandom(100_000)
        source = write(tmp_path, "in.pt", data)
        digest = store.put_file(source, "m/abc.pt")
        assert digest == digest_of(data)
        target = tmp_path / "out" / "got.pt"
        assert store.get_file("m/abc.pt", target, digest) == digest
        assert target.read_bytes() == data

    def test_large_object_crosses_chunk_boundaries(
        self, store: ObjectStore, tmp_path: Path
    ) -> None:
        data = os.urandom(self.large_size)
        source = write(tmp_path, "big.bin", data)
        progressed = []
        digest = store.put_file(source, "big/1.bin", progress=progressed.append)
        assert digest == digest_of(data)
        assert sum(progressed) == len(data)
        target = tmp_path / "big-out.bin"
        store.get_file("big/1.bin", target, digest)
        assert hashlib.sha256(target.read_bytes()).hexdigest() == digest.sha256

    def test_empty_file(self, store: ObjectStore, tmp_path: Path) -> None:
        source = write(tmp_path, "empty", b"")
        digest = store.put_file(source, "m/empty")
        assert digest == digest_of(b"")
        assert store.stat("m/empty").size == 0
        target = tmp_path / "empty-out"
        store.get_file("m/empty", target, digest)
        assert target.read_bytes() == b""

    def test_create_only_put_refuses_a_taken_key(self, store: ObjectStore, tmp_path: Path) -> None:
        first, second = b"first" * 1000, b"second" * 1000
        store.put_file(write(tmp_path, "a", first), "m/k.pt")
        with pytest.raises(ObjectExistsError) as caught:
            store.put_file(write(tmp_path, "b", second), "m/k.pt")
        assert caught.value.digest == digest_of(second)
        assert store.content_digest("m/k.pt") == digest_of(first)

    def test_put_without_if_absent_replaces(self, store: ObjectStore, tmp_path: Path) -> None:
        store.put_file(write(tmp_path, "a", b"old bytes"), "m/k.pt")
        store.put_file(write(tmp_path, "b", b"new bytes!"), "m/k.pt", if_absent=False)
        assert store.content_digest("m/k.pt") == digest_of(b"new bytes!")

    def test_concurrent_create_only_puts_have_one_winner(
        self, store: ObjectStore, tmp_path: Path
    ) -> None:
        payloads = [os.urandom(50_000) for _ in range(6)]
        sources = [write(tmp_path, f"p{i}", data) for i, data in enumerate(payloads)]
        outcomes: list[object] = [None] * len(sources)
        barrier = threading.Barrier(len(sources))

        def put(index: int) -> None:
            barrier.wait()
            try:
                outcomes[index] = store.put_file(sources[index], "race/k.bin")
            except ObjectExistsError as exc:
                outcomes[index] = exc

        threads = [threading.Thread(target=put, args=(i,)) for i in range(len(sources))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        winners = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, Digest)]
        assert len(winners) == 1
        assert sum(isinstance(o, ObjectExistsError) for o in outcomes) == len(sources) - 1
        assert store.content_digest("race/k.bin") == digest_of(payloads[winners[0]])

    def test_stat(self, store: ObjectStore, tmp_path: Path) -> None:
        assert store.stat("m/none.pt") is None
        assert not store.exists("m/none.pt")
        store.put_file(write(tmp_path, "a", b"12345"), "m/five.pt")
        info = store.stat("m/five.pt")
        assert info.key == "m/five.pt"
        assert info.size == 5
        assert info.sha256 in (None, digest_of(b"12345").sha256)
        assert store.exists("m/five.pt")

    def test_missing_object(self, store: ObjectStore, tmp_path: Path) -> None:
        with pytest.raises(NotFoundError):
            list(store.iter_bytes("m/none.pt"))
        download_dir = tmp_path / "downloads"
        download_dir.mkdir()
        target = download_dir / "never.pt"
        with pytest.raises(NotFoundError):
            store.get_file("m/none.pt", target, digest_of(b"x"))
        assert not target.exists()
        assert list(download_dir.iterdir()) == []

    def test_get_with_wrong_checksum_leaves_no_file(
        self, store: ObjectStore, tmp_path: Path
    ) -> None:
        store.put_file(write(tmp_path, "a", b"real bytes"), "m/k.pt")
        download_dir = tmp_path / "downloads"
        download_dir.mkdir()
        target = download_dir / "k.pt"
        wrong_sha = Digest("0" * 64, len(b"real bytes"))
        with pytest.raises(IntegrityError, match="sha256") as caught:
            store.get_file("m/k.pt", target, wrong_sha)
        wrong_size = Digest(digest_of(b"real bytes").sha256, 3)
        with pytest.raises(IntegrityError, match="size"):
            store.get_file("m/k.pt", target, wrong_size)
        assert list(download_dir.iterdir()) == []
        # the message names the stored object and the store, not a temp file
        assert f"sha256 mismatch for m/k.pt in {store.describe()}: expected {'0' * 64}" in str(
            caught.value
        )
        assert ".incomplete" not in str(caught.value)

    @pytest.mark.parametrize("problem", ["missing", "a-folder", "unreadable"])
    def test_an_unreadable_source_is_the_user_s_path_problem(
        self, store: ObjectStore, tmp_path: Path, problem: str
    ) -> None:
        """Exit 2 naming the file, not a storage error (exit 6): the store is fine."""
        source = tmp_path / "weights.pt"
        if problem == "a-folder":
            source.mkdir()
        elif problem == "unreadable":
            if not hasattr(os, "geteuid"):
                pytest.skip("Windows: permission bits cannot make a file unreadable")
            if os.geteuid() == 0:
                pytest.skip("root reads any file: permissions cannot make one unreadable")
            write(tmp_path, "weights.pt", b"secret")
            source.chmod(0)
        with pytest.raises(UsageError, match=f"cannot read {source}") as caught:
            store.put_file(source, "m/k.pt")
        assert not isinstance(caught.value, StorageError)
        assert store.stat("m/k.pt") is None

    def test_delete_is_idempotent(self, store: ObjectStore, tmp_path: Path) -> None:
        store.put_file(write(tmp_path, "a", b"x"), "m/k.pt")
        store.delete("m/k.pt")
        assert store.stat("m/k.pt") is None
        store.delete("m/k.pt")

    def test_list_by_prefix(self, store: ObjectStore, tmp_path: Path) -> None:
        source = write(tmp_path, "a", b"abc")
        for key in ("alpha/1.pt", "alpha/2.pt", "beta/1.pt"):
            store.put_file(source, key)
        assert sorted(o.key for o in store.list()) == ["alpha/1.pt", "alpha/2.pt", "beta/1.pt"]
        assert sorted(o.key for o in store.list("alpha/")) == ["alpha/1.pt", "alpha/2.pt"]
        assert all(o.size == 3 for o in store.list())

    def test_content_digest_reads_the_stored_bytes(
        self, store: ObjectStore, tmp_path: Path
    ) -> None:
        data = os.urandom(3000)
        store.put_file(write(tmp_path, "a", data), "m/k.pt")
        assert store.content_digest("m/k.pt") == digest_of(data)

    @pytest.mark.parametrize("key", ["../escape.pt", "/abs.pt", "a//b.pt", "a/./b", "a\\b", ""])
    def test_keys_that_escape_the_root_are_refused(
        self, store: ObjectStore, tmp_path: Path, key: str
    ) -> None:
        with pytest.raises(UsageError):
            store.put_file(write(tmp_path, "a", b"x"), key)
        with pytest.raises(UsageError):
            store.get_file(key, tmp_path / "out", digest_of(b"x"))

    # what interrupted uploads leave behind -------------------------------------------

    def test_a_fresh_store_has_no_leftovers(self, store: ObjectStore, tmp_path: Path) -> None:
        store.put_file(write(tmp_path, "a", b"stored"), "m/k.pt")
        assert list(store.leftovers(timedelta(0))) == []

    def test_leftovers_are_listed_by_age_and_removed(
        self, store: ObjectStore, tmp_path: Path
    ) -> None:
        stored = os.urandom(10_000)
        store.put_file(write(tmp_path, "a", stored), "m/k.pt")
        before = datetime.now(UTC) - timedelta(minutes=5)
        name = self.leave_leftover(store, tmp_path)
        assert list(store.leftovers(timedelta(days=1))) == []  # too young: may be in flight
        (leftover,) = store.leftovers(timedelta(0))
        assert leftover.name == name
        assert leftover.kind in {"multipart_upload", "temporary_part", "incomplete_file"}
        assert before < leftover.started_at <= datetime.now(UTC) + timedelta(seconds=5)
        assert leftover.size is None or leftover.size > 0
        store.remove_leftover(leftover)
        assert list(store.leftovers(timedelta(0))) == []
        store.remove_leftover(leftover)  # gone already: not an error
        assert [o.key for o in store.list()] == ["m/k.pt"]
        assert store.content_digest("m/k.pt") == digest_of(stored)
