"""`nexus merge-driver`: two branches that each stored a version merge into one registry."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from nexus_cli.errors import ConflictError
from nexus_cli.metadata import Metadata, VersionRecord, merge_metadata
from tests.conftest import Repo, run_nexus

A, B, C, D = ("a" * 40, "b" * 40, "c" * 40, "d" * 40)


def record(commit: str, *, created_at: str, sha: str = "e", **changes) -> VersionRecord:
    return VersionRecord(
        commit_hash=commit, model_name="m", storage_uri=f"m/{commit}.pt", sha256=sha * 64,
        size_bytes=1, format="unknown", created_at=created_at, **changes,
    )  # fmt: skip


def registry(*records: VersionRecord, latest: str) -> Metadata:
    metadata = Metadata({"m": [VersionRecord(**r.to_dict()) for r in records]})
    metadata.set_latest("m", latest)
    return metadata


def latest_and_order(metadata: Metadata) -> tuple[str, list[str]]:
    return metadata.latest("m").commit_hash, [v.commit_hash for v in metadata.versions("m")]


V_A = record(A, created_at="2026-01-01T00:00:00Z")
V_B = record(B, created_at="2026-01-02T00:00:00Z")
V_C = record(C, created_at="2026-01-03T00:00:00Z")
V_D = record(D, created_at="2026-01-03T00:00:00Z")  # same time as C


def test_one_side_stored_the_other_did_not_touch_the_model() -> None:
    base = registry(V_A, latest=A)
    ours = registry(V_A, latest=A)
    theirs = registry(V_A, V_B, latest=B)
    assert latest_and_order(merge_metadata(base, ours, theirs)) == (B, [A, B])
    assert latest_and_order(merge_metadata(base, theirs, ours)) == (B, [A, B])


def test_both_stored_the_newest_wins_and_ties_go_to_the_larger_commit() -> None:
    base = registry(V_A, latest=A)
    merged = merge_metadata(base, registry(V_A, V_C, latest=C), registry(V_A, V_B, latest=B))
    assert latest_and_order(merged) == (C, [A, C, B])
    tie = merge_metadata(base, registry(V_A, V_C, latest=C), registry(V_A, V_D, latest=D))
    assert latest_and_order(tie) == (D, [A, C, D])


def test_a_rollback_on_one_side_survives_a_store_free_merge() -> None:
    base = registry(V_A, V_B, latest=B)
    rolled_back = registry(V_A, V_B, latest=A)
    assert latest_and_order(merge_metadata(base, base, rolled_back)) == (A, [A, B])


def test_an_edit_on_one_side_is_kept() -> None:
    base = registry(V_A, latest=A)
    edited = registry(record(A, created_at=V_A.created_at, message="note"), latest=A)
    assert merge_metadata(base, base, edited).latest("m").message == "note"
    assert merge_metadata(base, edited, base).latest("m").message == "note"


def test_the_same_commit_with_other_bytes_is_a_conflict() -> None:
    other = record(B, created_at=V_B.created_at, sha="f")
    with pytest.raises(ConflictError, match="different objects"):
        merge_metadata(registry(V_A, latest=A), registry(V_A, V_B, latest=B),
                       registry(V_A, other, latest=B))  # fmt: skip


def test_a_model_new_on_one_side_only() -> None:
    base = Metadata()
    merged = merge_metadata(base, Metadata(), registry(V_A, latest=A))
    assert latest_and_order(merged) == (A, [A])


# the real thing: git calls the driver -----------------------------------------------------

DRIVER = f"{sys.executable} -m nexus_cli merge-driver %O %A %B"


def store(repo: Repo, data: bytes) -> dict:
    result = run_nexus("store", repo.write_weights("m.pt", data), "prod_model", "--json",
                       cwd=repo.path)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def two_branches_that_each_stored(repo: Repo) -> tuple[dict, dict]:
    assert run_nexus("init", cwd=repo.path).exit_code == 0
    repo.commit_all("nexus init")
    repo.git("checkout", "-q", "-b", "feature")
    repo.commit("feature work", filename="feature.py")
    theirs = store(repo, b"feature weights")
    repo.commit_all("store feature")
    repo.git("checkout", "-q", "main")
    repo.commit("main work", filename="main.py")
    ours = store(repo, b"main weights")
    repo.commit_all("store main")
    return ours, theirs


def test_git_merges_two_stores_with_the_driver(repo: Repo) -> None:
    ours, theirs = two_branches_that_each_stored(repo)
    assert (repo.path / ".gitattributes").read_text() == ".nexus_meta.json merge=nexus-meta\n"
    repo.git("config", "merge.nexus-meta.driver", DRIVER)
    repo.git("merge", "-q", "--no-edit", "feature")
    listed = json.loads(run_nexus("list", "--json", cwd=repo.path).stdout)
    assert [v["commit_hash"] for v in listed] == [theirs["commit_hash"], ours["commit_hash"]]
    newest = max((ours, theirs), key=lambda v: (v["created_at"], v["commit_hash"]))
    assert [v["commit_hash"] for v in listed if v["is_latest"]] == [newest["commit_hash"]]
    assert repo.git("status", "--porcelain") == ""


def test_without_the_driver_rollback_to_repairs_two_latest(cli, repo: Repo) -> None:
    ours, theirs = two_branches_that_each_stored(repo)
    meta = repo.path / ".nexus_meta.json"
    document = json.loads(meta.read_text())
    extra = json.loads(repo.git("show", "feature:.nexus_meta.json"))["models"]["prod_model"]
    document["models"]["prod_model"]["versions"] += extra["versions"]  # what a hand merge leaves
    meta.write_text(json.dumps(document))
    broken = cli("list", "--json")
    assert broken.exit_code == 2
    assert "nexus rollback prod_model --to SHA" in broken.json["error"]["message"]
    assert cli("rollback", "prod_model").exit_code == 2  # only --to may read it
    repaired = cli("rollback", "prod_model", "--to", theirs["commit_hash"][:10], "--json")
    assert repaired.exit_code == 0, repaired.stderr
    listed = cli("list", "--json").json
    assert [v["commit_hash"] for v in listed if v["is_latest"]] == [theirs["commit_hash"]]


def test_a_real_conflict_fails_the_driver_and_leaves_ours(tmp_path: Path) -> None:
    paths = {}
    other = record(B, created_at=V_B.created_at, sha="f")
    for name, metadata in (("base", registry(V_A, latest=A)), ("ours", registry(V_A, V_B,
                           latest=B)), ("theirs", registry(V_A, other, latest=B))):  # fmt: skip
        paths[name] = tmp_path / name
        metadata.write(paths[name])
    before = paths["ours"].read_bytes()
    result = run_nexus("merge-driver", paths["base"], paths["ours"], paths["theirs"], cwd=tmp_path)
    assert result.exit_code == 5
    assert "different objects" in result.stderr
    assert paths["ours"].read_bytes() == before


@pytest.mark.parametrize("missing", ["ours", "theirs"])
def test_a_missing_side_is_a_usage_error_that_writes_nothing(cli, tmp_path: Path, missing) -> None:
    """Git always passes both sides; a missing one is a typo, not an empty registry (the
    driver used to write a fresh registry under the typo's name and exit 0)."""
    paths = {name: tmp_path / name for name in ("base", "ours", "theirs")}
    for name in ("base", "ours", "theirs"):
        if name != missing:
            registry(V_A, latest=A).write(paths[name])
    result = cli("merge-driver", paths["base"], paths["ours"], paths["theirs"], "--json")
    assert result.exit_code == 2
    assert str(paths[missing]) in result.json["error"]["message"]
    assert not paths[missing].exists()


def test_init_declares_the_driver_once_and_keeps_other_attributes(cli, repo: Repo) -> None:
    (repo.path / ".gitattributes").write_text("*.pt binary")  # no final newline
    first = cli("init")
    assert first.exit_code == 0, first.stderr
    assert "git add .nexusrc .nexus_meta.json .gitattributes" in first.stdout
    assert 'git config merge.nexus-meta.driver "nexus merge-driver %O %A %B"' in first.stdout
    assert cli("init", "--force").exit_code == 0
    assert (repo.path / ".gitattributes").read_text() == (
        "*.pt binary\n.nexus_meta.json merge=nexus-meta\n"
    )
