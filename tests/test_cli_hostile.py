"""The CLI as an attacker (or an unlucky user) would try it: hostile targets, files and text.

Everything here must end with one line and a precise exit code, never exit 1, and must
leave what it refused untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Repo, make_repo, run_nexus

V1 = b"weights version one " * 500
V2 = b"weights version two, larger " * 900

# Permission checks cannot fail for root: drop the capabilities that bypass them.
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
UNPRIVILEGED = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if IS_ROOT else []
needs_unprivileged = pytest.mark.skipif(
    sys.platform == "win32" or (IS_ROOT and shutil.which("setpriv") is None),
    reason="POSIX permission bits, which root can only be held to with setpriv",
)
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="FIFOs and symlinks are POSIX")


def run_unprivileged(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*UNPRIVILEGED, sys.executable, "-m", "nexus_cli", *[str(a) for a in args]],
        cwd=cwd, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def stored(cli, repo: Repo, data: bytes = V1, *extra: str) -> dict:
    result = cli("store", repo.write_weights("m.pt", data), "prod_model", "--json", *extra)
    assert result.exit_code == 0, result.stderr
    return result.json


# load -o: targets that must never be replaced ------------------------------------------


@posix_only
def test_load_refuses_a_fifo_a_device_link_and_a_symlink(cli, repo: Repo, tmp_path: Path) -> None:
    stored(cli, repo)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    to_device = tmp_path / "null-link"
    to_device.symlink_to("/dev/null")
    real = tmp_path / "real.pt"
    real.write_bytes(b"keep me")
    to_file = tmp_path / "file-link"
    to_file.symlink_to(real)
    for target, words in ((fifo, "a FIFO"), (to_device, "a symbolic link"),
                          (to_file, "a symbolic link")):  # fmt: skip
        result = cli("load", "prod_model", "-o", target, "--json")
        assert result.exit_code == 2, (target, result.stdout)
        assert words in result.json["error"]["message"]
        assert str(target) in result.json["error"]["message"]
    assert fifo.is_fifo()
    assert to_device.is_symlink()
    assert to_file.is_symlink()
    assert real.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@posix_only
def test_load_into_a_folder_keeps_its_meaning(cli, repo: Repo, tmp_path: Path) -> None:
    record = stored(cli, repo)
    folder = tmp_path / "weights"
    folder.mkdir()
    link = tmp_path / "weights-link"
    link.symlink_to(folder)
    assert cli("load", "prod_model", "-o", folder).exit_code == 0
    assert cli("load", "prod_model", "-o", link).exit_code == 0
    assert (folder / f"prod_model-{record['commit_hash'][:7]}.pt").read_bytes() == V1
    assert link.is_symlink()


def test_load_to_a_new_folder_named_with_a_trailing_slash(cli, repo: Repo, tmp_path: Path) -> None:
    """`-o models/` means a folder, as it does to cp; it used to become a file named models."""
    record = stored(cli, repo)
    result = cli("load", "prod_model", "-o", f"{tmp_path / 'models'}/", "--json")
    assert result.exit_code == 0, result.stdout
    expected = tmp_path / "models" / f"prod_model-{record['commit_hash'][:7]}.pt"
    assert result.json["path"] == str(expected)
    assert expected.read_bytes() == V1


def test_load_under_an_existing_file_is_a_usage_error(cli, repo: Repo, tmp_path: Path) -> None:
    stored(cli, repo)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    result = cli("load", "prod_model", "-o", blocker / "sub" / "m.pt", "--json")
    assert result.exit_code == 2
    assert f"{blocker} is a file, not a folder" in result.json["error"]["message"]
    assert blocker.read_text() == "x"


@needs_unprivileged
def test_load_into_an_unwritable_folder_is_a_usage_error(cli, repo: Repo, tmp_path: Path) -> None:
    stored(cli, repo)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    result = run_unprivileged("load", "prod_model", "-o", locked / "m.pt", "--json", cwd=repo.path)
    assert result.returncode == 2, result.stderr
    assert str(locked) in json.loads(result.stdout)["error"]["message"]
    assert list(locked.iterdir()) == []


# input that cannot be read, metadata that cannot be written -------------------------------


@needs_unprivileged
def test_an_unreadable_input_is_a_usage_error_naming_it(repo: Repo) -> None:
    weights = repo.write_weights("m.pt", V1)
    weights.chmod(0)
    result = run_unprivileged("store", weights, "prod_model", "--json", cwd=repo.path)
    assert result.returncode == 2, result.stderr
    message = json.loads(result.stdout)["error"]["message"]
    assert str(weights) in message
    assert "readable" in message or "cannot read" in message
    assert not (repo.path / ".nexus").exists()


@needs_unprivileged
def test_unwritable_metadata_folder_says_the_object_is_uploaded(repo: Repo, tmp_path: Path) -> None:
    registry = repo.path / "registry"
    registry.mkdir()
    (registry / "keep.txt").write_text("tracked\n")
    repo.commit_all("registry folder")
    config = tmp_path / "nexusrc"
    config.write_text(f'[storage]\npath = "{tmp_path / "store"}"\n')
    registry.chmod(0o555)
    weights = repo.write_weights("m.pt", V1)
    args = ("store", weights, "prod_model", "--meta", registry / "models.json",
            "--config", config, "--json")  # fmt: skip
    # where even the lock cannot be made, the store is refused before the upload
    result = run_unprivileged(*args, cwd=repo.path)
    assert result.returncode == 2, result.stderr
    assert "cannot take the lock" in json.loads(result.stdout)["error"]["message"]
    assert not (tmp_path / "store" / "prod_model").exists()
    # the lock folder can be made, the registry beside it cannot be written
    registry.chmod(0o755)
    (registry / ".nexus").mkdir()
    registry.chmod(0o555)
    result = run_unprivileged(*args, cwd=repo.path)
    assert result.returncode == 2, result.stderr
    message = json.loads(result.stdout)["error"]["message"]
    assert "IS uploaded" in message
    assert "again" in message
    registry.chmod(0o755)
    again = run_nexus(*args, cwd=repo.path)
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["uploaded"] is False


# control characters and markup -------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [("-m", "hello\x1b[2J"), ("-m", "two\nlines"), ("--metric", "acc\x07=0.9"),
     ("--signature", '{"inputs": [{"name": "x\\u001b", "datatype": "FP32", "shape": [-1]}], '
                     '"outputs": []}')],
)  # fmt: skip
def test_control_characters_are_refused_at_store_time(cli, repo: Repo, args) -> None:
    result = cli("store", repo.write_weights("m.pt", V1), "prod_model", *args, "--json")
    assert result.exit_code == 2, result.stdout
    assert "control character" in result.json["error"]["message"]
    assert not (repo.path / ".nexus_meta.json").exists()


def test_control_characters_from_the_file_never_reach_the_terminal(cli, repo: Repo) -> None:
    stored(cli, repo)
    meta = repo.path / ".nexus_meta.json"
    document = json.loads(meta.read_text())
    version = document["models"]["prod_model"]["versions"][0]
    version["message"] = "\x1b[2Jcleared\x1b]0;title\x07 \u202eevil\n│ fake │ row"
    version["created_by"] = "Eve \x1b[31m<eve@example.com>"
    version["metrics"] = {"acc\x1b[1m": 0.5}
    meta.write_text(json.dumps(document))
    shown = run_nexus("list", cwd=repo.path)
    assert shown.exit_code == 0, shown.stderr
    for raw in ("\x1b", "\x07", "\u202e"):
        assert raw not in shown.stdout + shown.stderr
    assert "\\x1b[2Jcleared" in shown.stdout
    assert "\\n│ fake" in shown.stdout
    as_json = json.loads(run_nexus("list", "--json", cwd=repo.path).stdout)
    assert as_json[0]["message"] == version["message"]  # JSON keeps the data, escaped by JSON


def test_an_error_that_quotes_a_hostile_name_is_escaped(cli, repo: Repo) -> None:
    result = run_nexus("load", "prod_model", "--commit", "\x1b[2J", cwd=repo.path)
    assert result.exit_code == 2
    assert "\x1b" not in result.stderr
    assert "\\x1b[2J" in result.stderr


@pytest.mark.parametrize("folder", ["exp[v1]", "a[/x]", "b[bold]c[/bold]"])
def test_paths_with_rich_markup_print_as_they_are(tmp_path: Path, folder: str) -> None:
    repo = make_repo(tmp_path / "outer")
    meta = Path(folder) / ".nexus_meta.json"
    init = run_nexus("init", "--meta", meta, cwd=repo.path)
    assert init.exit_code == 0, init.stderr
    assert f"'{meta}'" in init.stdout
    repo.commit_all("init")
    result = run_nexus("store", repo.write_weights("m.pt", V1), "prod_model", "--meta", meta,
                       cwd=repo.path)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert f"git add '{meta}' && git commit" in result.stdout


def test_help_shows_defaults_and_no_bool_placeholders() -> None:
    shown = run_nexus("store", "--help", cwd=Path.cwd())
    assert shown.exit_code == 0
    assert "[default: .nexus_meta.json at the git root]" in " ".join(shown.stdout.split())
    assert "<bool>" not in shown.stdout
    assert "--allow-dirty" in shown.stdout


def test_version(tmp_path: Path) -> None:
    from nexus_cli import __version__

    shown = run_nexus("--version", cwd=tmp_path)
    assert shown.exit_code == 0
    assert shown.stdout.strip() == f"nexus {__version__}"


def test_an_ascii_terminal_gets_an_ascii_table(cli, repo: Repo) -> None:
    stored(cli, repo, V1, "-m", "caf\u00e9")
    shown = run_nexus("list", cwd=repo.path, env={"PYTHONIOENCODING": "ascii"})
    assert shown.exit_code == 0, shown.stderr
    assert "(* = latest)" in shown.stdout
    assert "* " + repo.head()[:7] in shown.stdout
    stored_again = run_nexus("store", repo.write_weights("m.pt", V1), "prod_model",
                             cwd=repo.path, env={"PYTHONIOENCODING": "ascii"})  # fmt: skip
    assert stored_again.exit_code == 0, stored_again.stderr
    assert "->" in stored_again.stdout


# hostile metadata through the CLI -----------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["[" * 100_000 + "]" * 100_000, '{"schema_version": ' + "1" * 5000 + ', "models": {}}',
     '{"schema_version": 1, "models": {"m": {"versions": []}}}',
     '{"schema_version": 1, "models": {"x": 1}, "models": {}}'],
)  # fmt: skip
def test_hostile_metadata_exits_2(cli, repo: Repo, text: str) -> None:
    (repo.path / ".nexus_meta.json").write_text(text)
    for args in (("list",), ("verify",), ("load", "m")):
        result = cli(*args, "--json")
        assert result.exit_code == 2, (args, result.stdout)
        assert result.json["error"]["code"] == "metadata_error"


def test_init_is_all_or_nothing(cli, repo: Repo) -> None:
    (repo.path / ".nexus_meta.json").write_text('{"schema_version": 2, "models": {}}')
    result = cli("init", "--json")
    assert result.exit_code == 2
    assert not (repo.path / ".nexusrc").exists()
    assert not (repo.path / ".gitattributes").exists()
    assert not (repo.path / ".nexus").exists()


# the store folder must not hide tracked files ---------------------------------------------


def test_a_local_store_at_the_repository_root_is_refused(cli, repo: Repo) -> None:
    (repo.path / ".nexusrc").write_text('[storage]\npath = "."\n')
    repo.commit_all("bad config")
    result = cli("store", repo.write_weights("m.pt", V1), "prod_model", "--json")
    assert result.exit_code == 2
    assert "git repository" in result.json["error"]["message"]
    assert (repo.path / ".gitignore").read_text() == "out/\n"
    assert cli("init", "--path", ".", "--force").exit_code == 2


def test_a_local_store_in_a_tracked_folder_is_refused(cli, repo: Repo) -> None:
    (repo.path / "src").mkdir()
    (repo.path / "src" / "train.py").write_text("print()\n")
    (repo.path / ".nexusrc").write_text('[storage]\npath = "src"\n')
    repo.commit_all("src")
    result = cli("store", repo.write_weights("m.pt", V1), "prod_model", "--json")
    assert result.exit_code == 2
    assert "tracks" in result.json["error"]["message"]
    assert not (repo.path / "src" / ".gitignore").exists()


@pytest.mark.parametrize("path", [".git", ".git/hooks"])
def test_a_local_store_inside_the_git_folder_is_refused(cli, repo: Repo, path: str) -> None:
    """git's own folder is no store: nexus wrote weights and a .gitignore into it."""
    (repo.path / ".nexusrc").write_text(f'[storage]\npath = "{path}"\n')
    repo.commit_all("bad config")
    result = cli("store", repo.write_weights("m.pt", V1), "prod_model", "--json")
    assert result.exit_code == 2
    assert ".git" in result.json["error"]["message"]
    assert not (repo.path / path / "prod_model").exists()
    assert not (repo.path / path / ".gitignore").exists()


# errors that tell the truth ------------------------------------------------------------------


def test_named_meta_and_config_must_exist(cli, repo: Repo, tmp_path: Path) -> None:
    stored(cli, repo)
    repo.commit_all("record")
    typo = repo.path / "typo.json"
    for args in (("verify",), ("list",), ("load", "prod_model"), ("rollback", "prod_model"),
                 ("gc",)):  # fmt: skip
        result = cli(*args, "--meta", typo, "--json")
        assert result.exit_code == 2, args
        assert "does not exist" in result.json["error"]["message"]
        result = cli(*args, "--config", tmp_path / "typo.nexusrc", "--json")
        assert result.exit_code == 2, args
    repo.commit("next")
    refused = cli("store", repo.write_weights("m.pt", V2), "prod_model",
                  "--config", tmp_path / "typo.nexusrc", "--json")  # fmt: skip
    assert refused.exit_code == 2
    assert "typo.nexusrc does not exist" in refused.json["error"]["message"]
    created = cli("store", repo.write_weights("m.pt", V2), "prod_model", "--meta", typo)
    assert created.exit_code == 0, created.stderr
    assert typo.exists()
    assert cli("init", "--config", tmp_path / "new.nexusrc").exit_code == 0


def test_load_commit_empty_is_refused(cli, repo: Repo) -> None:
    stored(cli, repo)
    result = cli("load", "prod_model", "--commit", "", "--json")
    assert result.exit_code == 2
    assert "invalid commit" in result.json["error"]["message"]


def test_an_ambiguous_prefix_has_its_own_code(cli, repo: Repo) -> None:
    record = stored(cli, repo)
    meta = repo.path / ".nexus_meta.json"
    document = json.loads(meta.read_text())
    first = document["models"]["prod_model"]["versions"][0]
    twin = {**first, "commit_hash": first["commit_hash"][:6] + "0" * 34, "is_latest": False}
    twin["storage_uri"] = f"prod_model/{twin['commit_hash']}.pt"
    if twin["commit_hash"] == record["commit_hash"]:
        twin["commit_hash"] = twin["commit_hash"][:-1] + "1"
        twin["storage_uri"] = f"prod_model/{twin['commit_hash']}.pt"
    document["models"]["prod_model"]["versions"].append(twin)
    meta.write_text(json.dumps(document))
    result = cli("load", "prod_model", "--commit", record["commit_hash"][:6], "--json")
    assert result.exit_code == 2
    assert result.json["error"]["code"] == "ambiguous_commit"


def test_verify_tells_missing_from_mismatch(cli, repo: Repo) -> None:
    record = stored(cli, repo)
    object_path = repo.path / ".nexus" / "store" / record["storage_uri"]
    object_path.unlink()
    missing = cli("verify", "--json")
    assert missing.exit_code == 4
    assert missing.json["error"]["code"] == "not_found"
    assert missing.json["results"][0]["status"] == "missing"
    human = cli("verify")
    assert "missing" in human.stderr
    assert "do not match" not in human.stderr
    object_path.write_bytes(V2[: len(V1)])
    mismatch = cli("verify", "--json")
    assert mismatch.exit_code == 7
    assert mismatch.json["error"]["code"] == "integrity_error"
    assert mismatch.json["ok"] is False


def test_store_force_repairs_a_corrupted_object(cli, repo: Repo) -> None:
    record = stored(cli, repo)
    object_path = repo.path / ".nexus" / "store" / record["storage_uri"]
    damaged = bytearray(V1)
    damaged[10] ^= 1
    object_path.write_bytes(bytes(damaged))
    assert cli("verify").exit_code == 7
    weights = repo.write_weights("m.pt", V1)
    assert cli("store", weights, "prod_model", "--json").json["uploaded"] is False  # trusted
    repaired = cli("store", weights, "prod_model", "--force", "--json")
    assert repaired.exit_code == 0
    assert repaired.json["uploaded"] is True
    assert object_path.read_bytes() == V1
    assert cli("verify").exit_code == 0
    again = cli("store", weights, "prod_model", "--force", "--json")
    assert again.json["uploaded"] is False  # intact bytes are not sent twice


def test_invalid_bucket_name_is_a_usage_error(cli, repo: Repo) -> None:
    result = cli("init", "--provider", "s3", "--bucket", "My_Models", "--json")
    assert result.exit_code == 2
    assert "invalid bucket name" in result.json["error"]["message"]
    (repo.path / ".nexusrc").write_text('[storage]\nprovider = "s3"\nbucket = "a"\n')
    assert cli("list", "--json").json["error"]["code"] == "config_error"


@pytest.mark.parametrize(
    "args",
    [("--input-shape", "8,,8"), ("--input-shape", "99999999999999999999"),
     ("--signature", '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1]}, '
                     '{"name": "x", "datatype": "FP32", "shape": [-1]}], "outputs": []}'),
     ("--signature", '{"inputs": [{"name": "x", "datatype": "FP32", '
                     '"shape": [-1, 9223372036854775808]}], "outputs": []}')],
)  # fmt: skip
def test_bad_signatures_are_refused(cli, repo: Repo, args) -> None:
    result = cli("store", repo.write_weights("m.pt", V1), "prod_model", *args)
    assert result.exit_code == 2, result.stdout


def test_a_waiting_command_says_so_on_stderr(cli, repo: Repo) -> None:
    from filelock import FileLock

    stored(cli, repo)
    repo.commit_all("record")
    repo.commit("next")
    weights = repo.write_weights("m.pt", V2)
    lock = FileLock(repo.path / ".nexus" / "meta.lock")
    with lock:
        process = subprocess.Popen(
            [sys.executable, "-m", "nexus_cli", "store", str(weights), "prod_model", "--json"],
            cwd=repo.path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(3)
        assert process.poll() is None  # still waiting
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "waiting for another nexus command" in err
    assert json.loads(out)["uploaded"] is True  # stdout is JSON only


def test_a_failure_while_rendering_is_still_one_line(cli, repo: Repo, monkeypatch) -> None:
    from nexus_cli import console

    stored(cli, repo)

    def broken_table(_versions) -> None:
        raise RuntimeError("terminal gone")

    monkeypatch.setattr(console, "versions_table", broken_table)
    result = cli("list")
    assert result.exit_code == 1
    assert "terminal gone" in result.stderr
    assert "Traceback" not in result.stderr


# files that are not files: a FIFO blocks a reader forever, /dev/zero never ends --------


@posix_only
@pytest.mark.parametrize("option", ["--meta", "--config"])
@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "folder"])
def test_meta_and_config_that_are_not_files_are_refused(
    repo: Repo, tmp_path: Path, option: str, kind: str
) -> None:
    odd = tmp_path / kind
    if kind == "fifo":
        os.mkfifo(odd)
    elif kind == "dev-zero":
        odd.symlink_to("/dev/zero")
    else:
        odd.mkdir()
    result = run_nexus("list", option, odd, "--json", cwd=repo.path, timeout=15)
    assert result.exit_code == 2, result.stderr
    message = result.json["error"]["message"]
    assert str(odd) in message
    assert "not a regular file" in message


@posix_only
def test_a_committed_link_to_a_device_is_refused_without_reading_it(repo: Repo) -> None:
    """`.nexusrc` and `.nexus_meta.json` arrive by pull request; git stores symlinks."""
    (repo.path / ".nexusrc").symlink_to("/dev/zero")
    result = run_nexus("list", "--json", cwd=repo.path, timeout=15)
    assert result.exit_code == 2
    assert "a character device, not a regular file" in result.json["error"]["message"]
    (repo.path / ".nexusrc").unlink()
    (repo.path / ".nexus_meta.json").symlink_to("/dev/zero")
    result = run_nexus("list", "--json", cwd=repo.path, timeout=15)
    assert result.exit_code == 2
    assert "a character device, not a regular file" in result.json["error"]["message"]


def test_an_oversized_nexusrc_is_refused(cli, repo: Repo) -> None:
    (repo.path / ".nexusrc").write_text('[storage]\nprovider = "local"\n' + "#" * (2 << 20))
    result = cli("list", "--json")
    assert result.exit_code == 2
    assert "larger than" in result.json["error"]["message"]


def test_a_hostile_safetensors_header_is_an_unknown_format(cli, repo: Repo) -> None:
    """Format detection reads the file's header as JSON; nested past the parser's depth it
    raised RecursionError after the upload (exit 1, an object without a record)."""
    header = b'{"a":' * 50_000 + b"1" + b"}" * 50_000
    weights = repo.write_weights("deep.safetensors", len(header).to_bytes(8, "little") + header)
    result = cli("store", weights, "prod_model", "--json")
    assert result.exit_code == 0, result.stdout
    assert result.json["format"] == "unknown"


@posix_only
def test_a_committed_metadata_link_out_of_the_repository_is_refused(
    cli, repo: Repo, tmp_path: Path
) -> None:
    """Git records a link, not what it points to: a store through a link that leaves the
    repository wrote (and made folders) anywhere on disk, and the record never reached git."""
    outside = tmp_path / "elsewhere" / "deep" / "registry.json"
    (repo.path / ".nexus_meta.json").symlink_to(outside)
    repo.commit_all("a pull request adds a link")
    result = cli("store", repo.write_weights("m.pt", V1), "prod_model", "--json")
    assert result.exit_code == 2
    assert "outside the git repository" in result.json["error"]["message"]
    assert not outside.parent.exists()


@posix_only
def test_a_metadata_link_inside_the_repository_is_written_through(cli, repo: Repo) -> None:
    (repo.path / "registry").mkdir()
    (repo.path / ".nexus_meta.json").symlink_to("registry/meta.json")
    repo.commit_all("the registry lives in a folder")
    result = cli("store", repo.write_weights("m.pt", V1), "prod_model")
    assert result.exit_code == 0
    assert (repo.path / ".nexus_meta.json").is_symlink()
    assert "prod_model" in json.loads((repo.path / "registry" / "meta.json").read_text())["models"]
    # the hint names the file that changed: `git add` of the link would stage nothing
    assert "git add registry/meta.json && git commit" in result.stdout


def test_a_file_where_the_lock_folder_goes_is_refused_before_the_upload(cli, repo: Repo) -> None:
    """`.nexus` beside the metadata holds the lock; a file there (committed, say) made store
    upload and then fail, and rollback exit 1 with FileExistsError."""
    (repo.path / ".nexus").write_text("not a folder")
    (repo.path / ".nexusrc").write_text('[storage]\npath = "store"\n')
    repo.commit_all("a file named .nexus")
    result = cli("store", repo.write_weights("m.pt", V1), "prod_model", "--json")
    assert result.exit_code == 2
    assert str(repo.path / ".nexus") in result.json["error"]["message"]
    assert not (repo.path / "store" / "prod_model").exists()  # nothing uploaded
    result = cli("rollback", "prod_model", "--json")
    assert result.exit_code == 2
    assert str(repo.path / ".nexus") in result.json["error"]["message"]


@posix_only
@pytest.mark.parametrize("name", [".gitattributes", ".nexusrc", ".nexus_meta.json"])
def test_init_writes_through_no_link_out_of_the_repository(
    cli, repo: Repo, tmp_path: Path, name: str
) -> None:
    outside = tmp_path / "elsewhere" / "file"
    (repo.path / name).symlink_to(outside)
    repo.commit_all("a link")
    result = cli("init", "--force", "--json")
    assert result.exit_code == 2
    assert "outside the git repository" in result.json["error"]["message"]
    assert not outside.parent.exists()
    assert not (repo.path / ".nexusrc").exists() or name == ".nexusrc"
