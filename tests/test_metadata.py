"""`.nexus_meta.json`: strict reading with located errors, stable atomic writing, locking."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from nexus_cli.errors import AmbiguousCommitError, MetadataError, NotFoundError
from nexus_cli.metadata import Metadata, VersionRecord, edit_metadata

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def record(commit: str, model: str = "prod_model", **changes) -> VersionRecord:
    values = dict(
        commit_hash=commit, model_name=model, storage_uri=f"{model}/{commit}.pt",
        sha256="c" * 64, size_bytes=10, format="torchscript", created_at="2026-11-23T18:00:00Z",
        created_by="Ada <ada@example.com>",
    )  # fmt: skip
    values.update(changes)
    return VersionRecord(**values)


def two_versions() -> Metadata:
    metadata = Metadata()
    metadata.put(record(COMMIT_A), make_latest=True)
    metadata.put(record(COMMIT_B), make_latest=True)
    return metadata


def test_round_trip_keeps_order_and_latest(tmp_path: Path) -> None:
    path = tmp_path / ".nexus_meta.json"
    two_versions().write(path)
    again = Metadata.read(path)
    assert [v.commit_hash for v in again.versions("prod_model")] == [COMMIT_A, COMMIT_B]
    assert again.latest("prod_model").commit_hash == COMMIT_B


def test_written_form_is_stable_and_matches_the_contract(tmp_path: Path) -> None:
    path = tmp_path / ".nexus_meta.json"
    two_versions().write(path)
    first = path.read_bytes()
    Metadata.read(path).write(path)
    assert path.read_bytes() == first
    assert first.endswith(b"}\n")
    document = json.loads(first)
    assert list(document) == ["schema_version", "models"]
    version = document["models"]["prod_model"]["versions"][0]
    assert list(version) == [
        "commit_hash", "model_name", "storage_uri", "sha256", "size_bytes", "format",
        "signature", "created_at", "created_by", "message", "metrics", "is_latest",
    ]  # fmt: skip
    assert [p.name for p in tmp_path.iterdir()] == [".nexus_meta.json"]


def test_missing_file_is_an_empty_registry(tmp_path: Path) -> None:
    assert Metadata.read(tmp_path / "none.json").models == {}


def _corrupt(document: dict, path: str, value) -> dict:
    target = document
    keys = path.split(".")
    for key in keys[:-1]:
        target = target[int(key)] if key.isdigit() else target[key]
    last = keys[-1]
    if value is KeyError:
        del target[last]
    else:
        target[int(last) if last.isdigit() else last] = value
    return document


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("schema_version", 2, "schema_version is 2"),
        ("models", [], "'models' must be an object"),
        ("models.prod_model.versions.0.sha256", "xyz", r"versions\[0\]\.sha256"),
        ("models.prod_model.versions.1.commit_hash", "ABC", r"versions\[1\]\.commit_hash"),
        ("models.prod_model.versions.0.size_bytes", "10", r"size_bytes: expected int"),
        ("models.prod_model.versions.0.storage_uri", "../../etc/passwd", "storage_uri"),
        (
            "models.prod_model.versions.0.storage_uri",
            "prod_model/" + "a" * 40 + "/x",
            "storage_uri",
        ),
        ("models.prod_model.versions.0.format", "onnx", "format"),
        ("models.prod_model.versions.0.is_latest", True, "exactly one version"),
        ("models.prod_model.versions.0.model_name", "other", "listed under"),
        ("models.prod_model.versions.0.metrics", {"acc": "high"}, "metrics.acc"),
        ("models.prod_model.versions.0.signature", {"inputs": 1}, "signature"),
        ("models.prod_model.versions.0.created_by", KeyError, "missing field"),
        ("models.prod_model.versions.0.extra", 1, "unknown field"),
    ],
)
def test_broken_files_say_what_and_where(tmp_path: Path, path: str, value, message: str) -> None:
    document = _corrupt(two_versions().to_dict(), path, value)
    target = tmp_path / ".nexus_meta.json"
    target.write_text(json.dumps(document))
    with pytest.raises(MetadataError, match=message):
        Metadata.read(target)


def test_invalid_json_names_line_and_column(tmp_path: Path) -> None:
    target = tmp_path / ".nexus_meta.json"
    target.write_text('{\n  "schema_version": 1,\n  "models": {,}\n}\n')
    with pytest.raises(MetadataError, match="line 3 column"):
        Metadata.read(target)


def test_find_by_prefix() -> None:
    metadata = Metadata()
    metadata.put(record("abcd" + "1" * 36), make_latest=True)
    metadata.put(record("abcd" + "2" * 36), make_latest=True)
    assert metadata.find("prod_model", "abcd2").commit_hash.endswith("2" * 36)
    with pytest.raises(AmbiguousCommitError, match="matches 2 versions"):
        metadata.find("prod_model", "abcd")
    with pytest.raises(NotFoundError):
        metadata.find("prod_model", "ffff")
    with pytest.raises(NotFoundError, match="known models: prod_model"):
        metadata.latest("other")


def test_put_without_latest_keeps_the_current_one() -> None:
    metadata = Metadata()
    metadata.put(record(COMMIT_A), make_latest=False)  # the first version is latest anyway
    metadata.put(record(COMMIT_B), make_latest=False)
    assert metadata.latest("prod_model").commit_hash == COMMIT_A


def _add_model(path: str, index: int) -> None:
    with edit_metadata(Path(path)) as metadata:
        metadata.put(record(f"{index:040x}", model=f"m{index}"), make_latest=True)


def test_concurrent_edits_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / ".nexus_meta.json"
    context = multiprocessing.get_context("spawn")
    with context.Pool(4) as pool:
        pool.starmap(_add_model, [(str(path), i) for i in range(1, 17)])
    assert sorted(Metadata.read(path).models) == sorted(f"m{i}" for i in range(1, 17))
