"""The `nexus` CLI on the local store: real git repositories, the real command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Repo, make_repo, run_nexus

V1 = b"weights version one " * 500
V2 = b"weights version two, larger " * 900


def store_path(repo: Repo, record: dict) -> Path:
    return repo.path / ".nexus" / "store" / record["storage_uri"]


def test_round_trip_store_list_load_rollback_verify(cli, repo: Repo, tmp_path: Path) -> None:
    first_commit = repo.head()
    stored = cli("store", repo.write_weights("model.pt", V1), "prod_model", "-m", "first",
                 "--metric", "acc=0.91", "--json")  # fmt: skip
    assert stored.exit_code == 0, stored.stderr
    first = stored.json
    assert first["uploaded"] is True
    assert first["commit_hash"] == first_commit
    assert first["storage_uri"] == f"prod_model/{first_commit}.pt"
    assert first["size_bytes"] == len(V1)
    assert first["created_by"] == "Ada Lovelace <ada@example.com>"
    assert first["metrics"] == {"acc": 0.91}
    assert first["is_latest"] is True
    assert store_path(repo, first).read_bytes() == V1
    repo.commit_all("record prod_model v1")

    second_commit = repo.commit("train more")
    second = cli("store", repo.write_weights("model.pt", V2), "prod_model", "--json").json
    assert second["commit_hash"] == second_commit
    repo.commit_all("record prod_model v2")

    listed = cli("list", "--json").json
    assert [v["commit_hash"] for v in listed] == [second_commit, first_commit]
    assert [v["is_latest"] for v in listed] == [True, False]
    assert cli("list", "prod_model", "--json").json == listed

    out = tmp_path / "downloads"
    out.mkdir()
    loaded = cli("load", "prod_model", "-o", out / "latest.pt", "--json").json
    assert (out / "latest.pt").read_bytes() == V2
    assert loaded == {
        "model_name": "prod_model",
        "commit_hash": second_commit,
        "path": str(out / "latest.pt"),
        "sha256": second["sha256"],
        "size_bytes": len(V2),
    }

    rolled = cli("rollback", "prod_model", "--json").json
    assert rolled == {"model_name": "prod_model", "from_commit": second_commit,
                      "to_commit": first_commit}  # fmt: skip
    assert cli("load", "prod_model", "-o", out / "after.pt").exit_code == 0
    assert (out / "after.pt").read_bytes() == V1
    assert cli("load", "prod_model", "--commit", second_commit[:8], "-o", out).exit_code == 0
    assert (out / f"prod_model-{second_commit[:7]}.pt").read_bytes() == V2

    verified = cli("verify", "--json")
    assert verified.exit_code == 0
    assert verified.json["counts"] == {"ok": 2, "missing": 0, "mismatch": 0}


def test_human_output_tells_how_to_commit_the_metadata(cli, repo: Repo) -> None:
    result = cli("store", repo.write_weights("m.pt", V1), "prod_model")
    assert result.exit_code == 0
    assert "Stored prod_model@" in result.stdout
    assert 'git add .nexus_meta.json && git commit -m "nexus: store prod_model@' in result.stdout
    table = cli("list")
    assert "latest" in table.stdout
    assert repo.head()[:7] in table.stdout


def test_as_a_separate_process(repo: Repo) -> None:
    weights = repo.write_weights("m.pt", V1)
    stored = run_nexus("store", weights, "prod_model", "--json", cwd=repo.path)
    assert stored.exit_code == 0, stored.stderr
    assert json.loads(stored.stdout)["uploaded"] is True
    listed = run_nexus("list", "--json", cwd=repo.path)
    assert [v["sha256"] for v in json.loads(listed.stdout)] == [json.loads(stored.stdout)["sha256"]]
    loaded = run_nexus("load", "prod_model", "--json", cwd=repo.path / "out")
    assert Path(json.loads(loaded.stdout)["path"]).read_bytes() == V1


def test_default_load_path_is_in_the_current_directory(cli, repo: Repo) -> None:
    cli("store", repo.write_weights("m.pt", V1), "prod_model")
    assert cli("load", "prod_model").exit_code == 0
    assert (repo.path / f"prod_model-{repo.head()[:7]}.pt").read_bytes() == V1


def test_works_from_a_subfolder(cli, repo: Repo, monkeypatch: pytest.MonkeyPatch) -> None:
    sub = repo.path / "src" / "deep"
    sub.mkdir(parents=True)
    (sub / "x.py").write_text("x = 1\n")
    repo.commit_all("add src")
    monkeypatch.chdir(sub)
    assert cli("store", repo.write_weights("m.pt", V1), "prod_model").exit_code == 0
    assert (repo.path / ".nexus_meta.json").exists()
    assert not (sub / ".nexus_meta.json").exists()


def test_same_bytes_twice_uploads_nothing(cli, repo: Repo) -> None:
    weights = repo.write_weights("m.pt", V1)
    first = cli("store", weights, "prod_model", "--json").json
    stored = store_path(repo, first)
    before = stored.stat()
    again = cli("store", weights, "prod_model", "--json")
    assert again.exit_code == 0
    assert again.json["uploaded"] is False
    assert again.json["sha256"] == first["sha256"]
    after = stored.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert len(repo.meta["models"]["prod_model"]["versions"]) == 1


def test_storing_the_same_bytes_again_asks_the_store_once(
    cli, repo: Repo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One question to the store (a HEAD request on S3) and one read of the registry
    before the locked edit: the answers are passed along, not asked for again."""
    from nexus_cli.metadata import Metadata
    from nexus_cli.storage.local import LocalStore

    weights = repo.write_weights("m.pt", V1)
    assert cli("store", weights, "prod_model").exit_code == 0
    calls: list[str] = []
    stat, read = LocalStore.stat, Metadata.read.__func__
    monkeypatch.setattr(LocalStore, "stat", lambda s, key: calls.append("stat") or stat(s, key))
    monkeypatch.setattr(
        Metadata, "read", classmethod(lambda c, *a, **k: calls.append("read") or read(c, *a, **k))
    )
    again = cli("store", weights, "prod_model", "--json")
    assert again.json["uploaded"] is False
    assert calls == ["read", "stat", "read"]  # the second read is under the lock


def test_different_bytes_at_the_same_commit_conflict(cli, repo: Repo) -> None:
    first = cli("store", repo.write_weights("m.pt", V1), "prod_model", "--json").json
    other = repo.write_weights("m.pt", V2)
    refused = cli("store", other, "prod_model", "--json")
    assert refused.exit_code == 5
    assert refused.json["error"]["code"] == "conflict"
    assert "--force" in refused.stderr
    assert store_path(repo, first).read_bytes() == V1
    assert repo.meta["models"]["prod_model"]["versions"][0]["sha256"] == first["sha256"]

    forced = cli("store", other, "prod_model", "--force", "--json")
    assert forced.exit_code == 0
    assert forced.json["uploaded"] is True
    assert store_path(repo, first).read_bytes() == V2
    assert repo.meta["models"]["prod_model"]["versions"][0]["sha256"] == forced.json["sha256"]


def test_another_file_type_at_the_same_commit_conflicts(cli, repo: Repo) -> None:
    cli("store", repo.write_weights("m.pt", V1), "prod_model")
    refused = cli("store", repo.write_weights("m.safetensors", V1), "prod_model")
    assert refused.exit_code == 5
    assert "already has a version at commit" in refused.stderr


def test_no_latest_and_signature(cli, repo: Repo) -> None:
    cli("store", repo.write_weights("m.pt", V1), "prod_model")
    first = repo.head()
    repo.commit_all("record")
    repo.commit("next")
    result = cli("store", repo.write_weights("m.pt", V2), "prod_model", "--no-latest",
                 "--input-shape", "8", "--json")  # fmt: skip
    assert result.json["is_latest"] is False
    assert result.json["signature"]["inputs"][0]["shape"] == [-1, 8]
    assert cli("list", "--json").json[1]["commit_hash"] == first
    assert cli("list", "--json").json[1]["is_latest"] is True
    both = cli("store", repo.write_weights("m.pt", V2), "prod_model", "--input-shape", "8",
               "--signature", "{}")  # fmt: skip
    assert both.exit_code == 2


def test_dirty_working_tree_is_refused(cli, repo: Repo) -> None:
    weights = repo.write_weights("m.pt", V1)
    (repo.path / "code.py").write_text("changed = True\n")
    repo.git("add", "code.py")
    repo.git("commit", "-q", "-m", "code")
    (repo.path / "code.py").write_text("changed = False\n")
    refused = cli("store", weights, "prod_model", "--json")
    assert refused.exit_code == 3
    assert "code.py" in refused.json["error"]["message"]
    assert not (repo.path / ".nexus_meta.json").exists()
    assert cli("store", weights, "prod_model", "--allow-dirty").exit_code == 0


def test_untracked_files_count_but_ignored_ones_and_the_metadata_do_not(cli, repo: Repo) -> None:
    weights = repo.write_weights("m.pt", V1)  # under out/, which .gitignore names
    assert cli("store", weights, "prod_model").exit_code == 0  # metadata is new and untracked
    repo.commit_all("record")
    repo.commit("next")
    meta = repo.path / ".nexus_meta.json"
    meta.write_text(meta.read_text())  # touched, and then a real change below
    (repo.path / "notes.txt").write_text("untracked\n")
    refused = cli("store", repo.write_weights("m.pt", V2), "prod_model")
    assert refused.exit_code == 3
    assert "notes.txt" in refused.stderr
    (repo.path / "notes.txt").unlink()
    cli("rollback", "prod_model")  # the metadata file now has uncommitted changes
    assert cli("store", repo.write_weights("m.pt", V2), "prod_model").exit_code == 0


def test_not_a_repository_and_no_commit(cli, tmp_path: Path, monkeypatch) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "m.pt").write_bytes(V1)
    monkeypatch.chdir(plain)
    outside = cli("store", "m.pt", "prod_model", "--json")
    assert outside.exit_code == 3
    assert "not inside a git repository" in outside.json["error"]["message"]
    assert cli("list").exit_code == 3

    fresh = make_repo(tmp_path / "fresh", commit=False)
    (fresh.path / "m.pt").write_bytes(V1)
    monkeypatch.chdir(fresh.path)
    empty = cli("store", "m.pt", "prod_model")
    assert empty.exit_code == 3
    assert "no commit yet" in empty.stderr
    assert not (fresh.path / ".nexus_meta.json").exists()


@pytest.mark.parametrize("name", ["../escape", "", "a" * 129, "a/b", ".hidden", "x y"])
def test_bad_model_names_exit_2_before_any_io(cli, tmp_path: Path, monkeypatch, name: str) -> None:
    # Outside any repository: if the name were checked after I/O, git would fail first (exit 3).
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    for args in (("store", "missing.pt", name), ("load", name), ("rollback", name),
                 ("list", name), ("verify", name)):  # fmt: skip
        result = cli(*args, "--json")
        assert result.exit_code == 2, args
        assert result.json["error"]["code"] == "invalid_name"
    assert list(empty.iterdir()) == []


def test_unknown_model_and_commit(cli, repo: Repo) -> None:
    cli("store", repo.write_weights("m.pt", V1), "prod_model")
    missing_model = cli("load", "other_model", "--json")
    assert missing_model.exit_code == 4
    assert "known models: prod_model" in missing_model.json["error"]["message"]
    assert cli("load", "prod_model", "--commit", "deadbeef").exit_code == 4
    assert cli("load", "prod_model", "--commit", "not-hex").exit_code == 2
    assert cli("rollback", "prod_model", "--to", "deadbeef").exit_code == 4
    assert cli("rollback", "prod_model").exit_code == 4  # nothing before the first version
    assert cli("list", "other_model").exit_code == 4


def test_corrupted_object_is_caught_by_load_and_verify(cli, repo: Repo, tmp_path: Path) -> None:
    record = cli("store", repo.write_weights("m.pt", V1), "prod_model", "--json").json
    stored = store_path(repo, record)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, same size
    stored.write_bytes(bytes(data))
    target = tmp_path / "dl" / "m.pt"
    loaded = cli("load", "prod_model", "-o", target, "--json")
    assert loaded.exit_code == 7
    assert "sha256 mismatch" in loaded.json["error"]["message"]
    assert not target.exists()
    assert list(target.parent.iterdir()) == []
    verified = cli("verify", "--json")
    assert verified.exit_code == 7
    assert verified.json["results"][0]["status"] == "mismatch"

    stored.write_bytes(bytes(data[:-1]))  # truncated
    assert cli("load", "prod_model", "-o", target).exit_code == 7
    assert cli("verify", "--json").json["results"][0]["detail"].startswith("size")


def test_missing_object(cli, repo: Repo, tmp_path: Path) -> None:
    record = cli("store", repo.write_weights("m.pt", V1), "prod_model", "--json").json
    store_path(repo, record).unlink()
    target = tmp_path / "dl" / "m.pt"
    assert cli("load", "prod_model", "-o", target).exit_code == 4
    assert not target.exists()
    verified = cli("verify")
    assert verified.exit_code == 4
    assert "missing" in verified.stdout
    repo.commit_all("record")
    repo.commit("next")
    cli("store", repo.write_weights("m.pt", V2), "prod_model")
    refused = cli("rollback", "prod_model")
    assert refused.exit_code == 4
    assert "missing" in refused.stderr
    assert cli("store", repo.write_weights("m.pt", V2), "prod_model").exit_code == 0


def test_broken_metadata_file_says_where(cli, repo: Repo) -> None:
    cli("store", repo.write_weights("m.pt", V1), "prod_model")
    meta = repo.path / ".nexus_meta.json"
    meta.write_text(meta.read_text().replace('"size_bytes": ', '"size_bytes": "', 1))
    result = cli("list", "--json")
    assert result.exit_code == 2
    assert "line" in result.json["error"]["message"]
    meta.write_text('{"schema_version": 1, "models": {"prod_model": {"versions": [{}]}}}')
    result = cli("load", "prod_model")
    assert result.exit_code == 2
    assert "models.prod_model.versions[0]: missing field(s)" in result.stderr
    assert "Traceback" not in result.stderr


def test_custom_meta_and_config_paths(cli, repo: Repo, tmp_path: Path) -> None:
    meta = repo.path / "registry" / "models.json"
    config = tmp_path / "custom.nexusrc"
    config.write_text(f'[storage]\npath = "{tmp_path / "elsewhere"}"\n')
    result = cli("store", repo.write_weights("m.pt", V1), "prod_model",
                 "--meta", meta, "--config", config, "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "elsewhere" / result.json["storage_uri"]).read_bytes() == V1
    assert json.loads(meta.read_text())["models"]["prod_model"]["versions"][0]["sha256"]
    assert (
        cli("list", "--meta", meta, "--json").json[0]["storage_uri"] == result.json["storage_uri"]
    )


def test_secret_in_config_is_refused(cli, repo: Repo) -> None:
    (repo.path / ".nexusrc").write_text('[storage]\naws_secret_access_key = "x"\n')
    result = cli("list", "--json")
    assert result.exit_code == 2
    assert "secret-looking key" in result.json["error"]["message"]


def test_init(cli, repo: Repo) -> None:
    result = cli("init", "--json")
    assert result.exit_code == 0, result.stderr
    assert (repo.path / ".nexusrc").read_text().startswith('[storage]\nprovider = "local"')
    assert json.loads((repo.path / ".nexus_meta.json").read_text()) == {
        "schema_version": 1,
        "models": {},
    }
    assert cli("init").exit_code == 2  # .nexusrc exists
    repo.commit_all("nexus init")
    assert cli("store", repo.write_weights("m.pt", V1), "prod_model").exit_code == 0
    assert repo.git("status", "--porcelain") == "M .nexus_meta.json"  # the store is ignored
    again = cli("init", "--provider", "s3", "--bucket", "models", "--force")
    assert again.exit_code == 0
    assert 'bucket = "models"' in (repo.path / ".nexusrc").read_text()
    assert len(repo.meta["models"]["prod_model"]["versions"]) == 1  # history kept
    assert cli("init", "--provider", "s3", "--force").exit_code == 2  # no bucket


def test_errors_are_one_line_without_traceback(repo: Repo) -> None:
    result = run_nexus("load", "nothing_here", cwd=repo.path)
    assert result.exit_code == 4
    assert result.stdout == ""
    assert result.stderr.strip().count("\n") == 0
    usage = run_nexus("store", "--json", cwd=repo.path)
    assert usage.exit_code == 2
    assert json.loads(usage.stdout)["error"]["code"] == "usage_error"
    assert "Traceback" not in usage.stderr


def test_unexpected_errors_exit_1_and_debug_shows_the_traceback(
    cli, repo: Repo, monkeypatch
) -> None:
    from nexus_cli.api import Project

    def explode(*_args, **_kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Project, "list_versions", explode)
    result = cli("list", "--json")
    assert result.exit_code == 1
    assert "disk on fire" in result.json["error"]["message"]
    assert "Traceback" not in result.stderr
    assert "Traceback" in cli("list", "--debug").stderr


def test_metrics_must_be_numbers(cli, repo: Repo) -> None:
    weights = repo.write_weights("m.pt", V1)
    for bad in ("acc", "acc=high", "=1", "acc=nan"):
        assert cli("store", weights, "prod_model", "--metric", bad).exit_code == 2, bad
    assert not (repo.path / ".nexus_meta.json").exists()


def test_store_of_a_missing_file_or_a_folder_says_which(cli, repo: Repo) -> None:
    result = cli("store", "nope.pt", "prod_model")
    assert result.exit_code == 2
    assert "nope.pt does not exist" in result.stderr
    (repo.path / "out").mkdir()
    result = cli("store", "out", "prod_model")
    assert result.exit_code == 2
    assert "out is a folder, not a file" in result.stderr
    assert not (repo.path / ".nexus_meta.json").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
def test_progress_bar_on_a_terminal_only(repo: Repo) -> None:
    """On a pseudo-terminal `store` draws a transfer bar; piped, it prints none."""
    import pty

    weights = repo.write_weights("m.pt", os.urandom(64 * 1024 * 1024))
    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": "120", "TERM": "xterm"}
    env.pop("NO_COLOR", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "nexus_cli", "store", str(weights), "prod_model"],
        cwd=repo.path, stdout=follower, stderr=follower, env=env,
    )  # fmt: skip
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: the process is done
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    assert process.wait(timeout=60) == 0
    assert b"uploading m.pt" in shown
    assert b"MB" in shown
    repo.commit("next")
    piped = run_nexus("store", weights, "prod_model", cwd=repo.path)
    assert "uploading" not in piped.stdout + piped.stderr
