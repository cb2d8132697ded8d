"""The weights cache: keyed by sha256, verified before use, fetched once, shared safely."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import nexus_cli.cache as cache
from nexus_cli.api import Project
from nexus_cli.errors import IntegrityError, NotFoundError
from nexus_cli.files import is_temp_file
from nexus_cli.metadata import VersionRecord
from tests.servers import make_model_repo, publish

DATA = os.urandom(3 * 1024 * 1024 + 17)


@pytest.fixture
def stored(tmp_path: Path) -> tuple[Project, VersionRecord]:
    repo = make_model_repo(tmp_path / "project")
    weights = repo / "out" / "weights.bin"
    weights.parent.mkdir()
    weights.write_bytes(DATA)
    record = publish(repo, weights)
    return Project(repo / ".nexus_meta.json"), record


def store_object(project: Project, record: VersionRecord) -> Path:
    return project.meta_path.parent / ".nexus" / "store" / record.storage_uri


def count_fetches(project: Project, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []
    original = project.fetch

    def counting(record: VersionRecord, target: Path, **kwargs: object) -> Path:
        calls.append(target)
        return original(record, target, **kwargs)

    monkeypatch.setattr(project, "fetch", counting)
    return calls


def count_hashes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []
    original = cache.hash_file

    def counting(path: Path, *args: object) -> object:
        calls.append(path)
        return original(path, *args)

    monkeypatch.setattr(cache, "hash_file", counting)
    return calls


def test_default_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert cache.default_cache_dir({}) == Path.home() / ".cache" / "nexusml"
    assert cache.default_cache_dir({"XDG_CACHE_HOME": "/x"}) == Path("/x/nexusml")
    both = {"XDG_CACHE_HOME": "/x", "NEXUS_CACHE_DIR": str(tmp_path)}
    assert cache.default_cache_dir(both) == tmp_path


def test_miss_then_hit_downloads_once(
    stored, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project, record = stored
    fetches = count_fetches(project, monkeypatch)
    path = cache.fetch_cached(project, record, tmp_path / "cache")
    assert path == tmp_path / "cache" / f"{record.sha256}.bin"
    assert path.read_bytes() == DATA
    assert len(fetches) == 1

    store_object(project, record).unlink()  # only the cache can answer now
    assert cache.fetch_cached(project, record, tmp_path / "cache") == path
    assert len(fetches) == 1


def test_verified_hit_is_not_rehashed_until_the_file_changes(
    stored, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project, record = stored
    path = cache.fetch_cached(project, record, tmp_path / "cache")
    hashes = count_hashes(monkeypatch)
    assert cache.find_cached(record, tmp_path / "cache") == path
    assert hashes == []  # the download verified it; the sidecar remembers

    os.utime(path)  # a touch (or any write) changes the stamp: hash again
    assert cache.find_cached(record, tmp_path / "cache") == path
    assert hashes == [path]
    assert cache.find_cached(record, tmp_path / "cache") == path
    assert hashes == [path]


def test_changed_bytes_of_the_same_size_are_fetched_again(
    stored, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project, record = stored
    path = cache.fetch_cached(project, record, tmp_path / "cache")
    path.chmod(0o644)  # the cache keeps its files read-only
    stat = path.stat()
    with open(path, "r+b") as handle:  # same size, same mtime: only the ctime tells
        handle.seek(1000)
        handle.write(b"\x00\x01\x02")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    fetches = count_fetches(project, monkeypatch)
    assert cache.fetch_cached(project, record, tmp_path / "cache").read_bytes() == DATA
    assert len(fetches) == 1


def test_wrong_size_is_dropped(stored, tmp_path: Path) -> None:
    project, record = stored
    path = cache.fetch_cached(project, record, tmp_path / "cache")
    assert path.stat().st_mode & 0o777 == 0o444
    path.chmod(0o644)
    path.write_bytes(DATA[:-1])
    assert cache.find_cached(record, tmp_path / "cache") is None
    assert not path.exists()


def test_a_corrupt_store_leaves_nothing_in_the_cache(stored, tmp_path: Path) -> None:
    project, record = stored
    obj = store_object(project, record)
    obj.write_bytes(b"x" * len(DATA))
    with pytest.raises(IntegrityError):
        cache.fetch_cached(project, record, tmp_path / "cache")
    assert [p for p in (tmp_path / "cache").iterdir() if p.is_file()] == []
    obj.unlink()
    with pytest.raises(NotFoundError):
        cache.fetch_cached(project, record, tmp_path / "cache")


def test_threads_at_once_fetch_once(
    stored, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project, record = stored
    fetches = count_fetches(project, monkeypatch)
    results: list[Path] = []
    barrier = threading.Barrier(4)

    def fetch() -> None:
        barrier.wait()
        results.append(cache.fetch_cached(project, record, tmp_path / "cache"))

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 4
    assert len(set(results)) == 1
    assert len(fetches) == 1


_FETCH_IN_A_PROCESS = """
import sys
from pathlib import Path
from nexus_cli.api import Project
from nexus_cli.cache import fetch_cached
project = Project(Path(sys.argv[1]))
record = project.resolve("demo")
path = fetch_cached(project, record, Path(sys.argv[2]))
print(path.stat().st_size)
"""


def test_processes_sharing_a_cache_never_see_half_a_file(stored, tmp_path: Path) -> None:
    project, record = stored
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _FETCH_IN_A_PROCESS,
                str(project.meta_path),
                str(tmp_path / "cache"),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(3)
    ]
    sizes = [int(p.communicate(timeout=120)[0]) for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0]
    assert sizes == [len(DATA)] * 3
    names = [p.name for p in (tmp_path / "cache").iterdir() if p.is_file()]
    assert not [n for n in names if is_temp_file(n)]
    assert f"{record.sha256}.bin" in names


def test_a_good_copy_renamed_in_while_a_bad_one_is_hashed_is_kept(
    stored, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Process A hashes a corrupt cached file (seconds, for real weights) while process B
    renames a good copy into place: A must not then remove B's file (B's server would
    fail to load the path it was given)."""
    project, record = stored
    good = cache.fetch_cached(project, record, tmp_path / "cache")
    spare = tmp_path / "good-copy"
    spare.write_bytes(good.read_bytes())
    good.chmod(0o644)
    good.write_bytes(b"x" * len(DATA))  # corrupt, same size
    original = cache.hash_file

    def hash_while_another_process_repairs(path: Path, *args: object) -> object:
        digest = original(path, *args)
        os.replace(spare, path)  # process B's verified download lands meanwhile
        return digest

    monkeypatch.setattr(cache, "hash_file", hash_while_another_process_repairs)
    assert cache.find_cached(record, tmp_path / "cache") is None  # A saw a bad file
    assert good.read_bytes() == DATA  # and left B's good one alone


@pytest.mark.parametrize("kind", ["link to /dev/zero", "fifo", "folder"])
def test_a_cached_name_that_is_not_a_regular_file_is_a_miss(
    stored, tmp_path: Path, kind: str
) -> None:
    """Never read (a FIFO would block, /dev/zero never end) and never trusted; a fetch
    puts a verified file in its place where it can."""
    project, record = stored
    path = cache.cache_path(record, tmp_path / "cache")
    path.parent.mkdir(parents=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")
    assert cache.find_cached(record, tmp_path / "cache") is None
    if kind != "folder":
        fetched = cache.fetch_cached(project, record, tmp_path / "cache")
        assert fetched == path
        assert not path.is_symlink()
        assert path.read_bytes() == DATA
