"""`.nexus_meta.json` arrives by pull request: hostile documents are refused with a message."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from nexus_cli import metadata as metadata_module
from nexus_cli.errors import MetadataError, UsageError
from nexus_cli.metadata import Metadata, VersionRecord

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="symlinks to devices are POSIX")


def version(commit: str, *, latest: bool, created_at: str = "2026-11-23T18:00:00Z", **changes):
    values = dict(
        commit_hash=commit, model_name="prod_model", storage_uri=f"prod_model/{commit}.pt",
        sha256="d" * 64, size_bytes=10, format="torchscript", signature=None,
        created_at=created_at, created_by="Ada <ada@example.com>", message="", metrics={},
        is_latest=latest,
    )  # fmt: skip
    values.update(changes)
    return values


def document(*versions: dict, **top) -> dict:
    return {"schema_version": 1, "models": {"prod_model": {"versions": list(versions)}}, **top}


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / ".nexus_meta.json"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"schema_version": ' + "9" * 5000 + ', "models": {}}', "5000 digits"),
        ('{"schema_version": 1e99999, "models": {}}', "schema_version is"),
        ('{"schema_version": NaN, "models": {}}', "NaN is not a number"),
        ('{"schema_version": 1, "models": {}, "models": {}}', '"models" appears twice'),
        ('{"schema_version": true, "models": {}}', "schema_version is true"),
        ('{"schema_version": 1.0, "models": {}}', "schema_version is 1.0"),
        ('{"schema_version": 1, "models": {}, "owners": ["x"]}', "unknown top-level key"),
        ('{"schema_version": 1, "models": {"m": {"versions": []}}}', "at least one version"),
        (b'{"schema_version": 1, "models": {"\xff": 1}}', "not UTF-8"),
    ],
)
def test_hostile_documents_are_metadata_errors(tmp_path: Path, text, message: str) -> None:
    with pytest.raises(MetadataError, match=message):
        Metadata.read(write(tmp_path, text))


def test_duplicate_records_in_one_version_object_are_refused(tmp_path: Path) -> None:
    text = json.dumps(document(version(COMMIT_A, latest=True)))
    text = text.replace('"sha256": "', '"sha256": "' + "e" * 64 + '", "sha256": "', 1)
    with pytest.raises(MetadataError, match='"sha256" appears twice'):
        Metadata.read(write(tmp_path, text))


def test_a_huge_file_is_refused_before_parsing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(metadata_module, "MAX_METADATA_BYTES", 1000)
    path = write(tmp_path, json.dumps(document(version(COMMIT_A, latest=True))) + " " * 1000)
    with pytest.raises(MetadataError, match="larger than"):
        Metadata.read(path)


@pytest.mark.parametrize(
    "created_at",
    ["", "yesterday", "2026-11-23 18:00:00", "2026-11-23T18:00:00+02:00", "2026-13-40T18:00:00Z",
     "2026-11-23T18:00:00Z\x1b[2J"],
)  # fmt: skip
def test_created_at_must_be_a_utc_timestamp(tmp_path: Path, created_at: str) -> None:
    path = write(tmp_path, json.dumps(document(version(COMMIT_A, latest=True,
                                                       created_at=created_at))))  # fmt: skip
    with pytest.raises(MetadataError, match="created_at"):
        Metadata.read(path)


def test_two_latest_versions_are_refused_unless_read_leniently(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        json.dumps(
            document(
                version(COMMIT_A, latest=True, created_at="2026-11-23T18:00:00Z"),
                version(COMMIT_B, latest=True, created_at="2026-11-24T18:00:00Z"),
            )
        ),
    )
    with pytest.raises(MetadataError, match=r"found 2.*nexus rollback prod_model --to SHA"):
        Metadata.read(path)
    lenient = Metadata.read(path, lenient_latest=True)
    assert lenient.latest("prod_model").commit_hash == COMMIT_B
    lenient.set_latest("prod_model", COMMIT_A)
    lenient.write(path)
    assert Metadata.read(path).latest("prod_model").commit_hash == COMMIT_A


@posix_only
def test_a_symlinked_metadata_file_is_written_through_the_link(tmp_path: Path) -> None:
    real = tmp_path / "registry" / "models.json"
    real.parent.mkdir()
    Metadata.from_dict(document(version(COMMIT_A, latest=True))).write(real)
    link = tmp_path / ".nexus_meta.json"
    link.symlink_to(real)
    metadata = Metadata.read(link)
    metadata.put(VersionRecord(**version(COMMIT_B, latest=False)), make_latest=True)
    metadata.write(link)
    assert link.is_symlink()
    assert Metadata.read(real).latest("prod_model").commit_hash == COMMIT_B
    assert sorted(p.name for p in real.parent.iterdir()) == ["models.json"]  # no temp left


@posix_only
def test_a_metadata_link_to_something_else_is_refused(tmp_path: Path) -> None:
    link = tmp_path / ".nexus_meta.json"
    link.symlink_to("/dev/null")
    with pytest.raises(UsageError, match="character device"):
        Metadata().write(link)
    assert link.is_symlink()


def test_a_byte_order_mark_is_read_past(tmp_path: Path) -> None:
    """Windows editors save UTF-8 with a BOM; the registry is still the registry."""
    path = tmp_path / ".nexus_meta.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"schema_version": 1, "models": {}}).encode())
    assert Metadata.read(path).models == {}
