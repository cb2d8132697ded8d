"""The git facts nexus relies on, from real repositories."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nexus_cli import gitrepo
from nexus_cli.errors import GitError
from nexus_cli.files import temp_path_beside
from nexus_cli.gitrepo import GitRepo, holds_tracked_files, worktree_root
from tests.conftest import Repo, make_repo


def test_discover_from_a_subfolder_and_a_folder_yet_to_be_made(repo: Repo) -> None:
    sub = repo.path / "a" / "b"
    sub.mkdir(parents=True)
    assert GitRepo.discover(sub).root == repo.path.resolve()
    assert GitRepo.discover(repo.path / "not" / "made" / "yet").root == repo.path.resolve()
    assert GitRepo.discover(sub).head_commit() == repo.head()


def test_outside_a_repository(tmp_path: Path) -> None:
    with pytest.raises(GitError, match="not inside a git repository"):
        GitRepo.discover(tmp_path)


def test_a_bare_repository_or_the_git_folder_is_not_a_work_tree(repo: Repo, tmp_path: Path) -> None:
    bare = tmp_path / "bare.git"
    repo.git("init", "-q", "--bare", str(bare))
    with pytest.raises(GitError, match="bare repository or a .git folder"):
        GitRepo.discover(bare)
    with pytest.raises(GitError, match="bare repository or a .git folder"):
        GitRepo.discover(repo.path / ".git")


def test_without_a_git_executable(repo: Repo, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(GitError, match="git is not usable here"):
        GitRepo.discover(repo.path)


@pytest.mark.skipif(sys.platform == "win32", reason="a shell-script git")
def test_a_git_that_hangs_is_given_up_on(repo: Repo, tmp_path: Path, monkeypatch) -> None:
    """A wedged git (a network filesystem, a stuck fsmonitor) fails the command in bounded
    time, and the stuck processes are killed, not left behind."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "git").write_text("#!/bin/sh\nexec sleep 30\n")
    (fake / "git").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(gitrepo, "GIT_TIMEOUT", 1)
    started = time.monotonic()
    repo_facts = GitRepo.start(repo.path)
    with pytest.raises(GitError, match="did not finish within 1 s"):
        repo_facts.head_commit()
    repo_facts.close()
    assert time.monotonic() - started < 10
    assert all(query._process is None for query in repo_facts._queries)  # none left running


def test_staged_deleted_and_conflicted_paths_are_dirty(repo: Repo) -> None:
    repo.commit("two files", filename="a.py")
    repo.commit("and another", filename="b.py")
    (repo.path / "a.py").write_text("staged change\n")
    repo.git("add", "a.py")
    (repo.path / "b.py").unlink()
    assert sorted(GitRepo.discover(repo.path).dirty_paths()) == ["a.py", "b.py"]
    repo.git("checkout", "-q", "--", "b.py")
    repo.git("commit", "-q", "-am", "a")
    base = repo.head()
    (repo.path / "a.py").write_text("ours\n")
    repo.git("commit", "-q", "-am", "ours")
    repo.git("checkout", "-q", "-b", "theirs", base)
    (repo.path / "a.py").write_text("theirs\n")
    repo.git("commit", "-q", "-am", "theirs")
    merged = subprocess.run(["git", "merge", "-q", "-"], cwd=repo.path, capture_output=True)
    assert merged.returncode != 0  # a conflict in a.py
    assert GitRepo.discover(repo.path).dirty_paths() == ["a.py"]


def test_no_commit_yet(tmp_path: Path) -> None:
    fresh = make_repo(tmp_path / "fresh", commit=False)
    with pytest.raises(GitError, match="no commit yet"):
        GitRepo.discover(fresh.path).head_commit()


def test_dirty_paths(repo: Repo) -> None:
    assert GitRepo.discover(repo.path).dirty_paths() == []
    (repo.path / "out").mkdir()
    (repo.path / "out" / "weights.pt").write_bytes(b"ignored by .gitignore")
    assert GitRepo.discover(repo.path).dirty_paths() == []
    (repo.path / "new.txt").write_text("untracked\n")
    (repo.path / ".gitignore").write_text("out/\n# edited\n")
    (repo.path / "with space and ünïcode.txt").write_text("untracked\n")
    git_repo = GitRepo.discover(repo.path)
    assert sorted(git_repo.dirty_paths()) == [".gitignore", "new.txt", "with space and ünïcode.txt"]
    assert git_repo.dirty_paths({repo.path / ".gitignore"}) == [
        "new.txt",
        "with space and ünïcode.txt",
    ]
    # a snapshot: what git said when the command started, however the tree changes after
    (repo.path / "later.txt").write_text("untracked\n")
    assert "later.txt" not in git_repo.dirty_paths()


def test_renames_are_reported_once(repo: Repo) -> None:
    repo.commit("add", filename="old.py")
    repo.git("mv", "old.py", "new.py")
    assert GitRepo.discover(repo.path).dirty_paths() == ["new.py"]


def test_another_writers_temp_files_are_not_dirt(repo: Repo) -> None:
    temp = temp_path_beside(repo.path / ".nexus_meta.json")
    temp.write_text("{}")
    assert GitRepo.discover(repo.path).dirty_paths() == []
    (repo.path / "notes.incomplete").write_text("a user's file")
    assert GitRepo.discover(repo.path).dirty_paths() == ["notes.incomplete"]


def test_identity(repo: Repo, tmp_path: Path) -> None:
    assert GitRepo.discover(repo.path).identity() == "Ada Lovelace <ada@example.com>"
    anonymous = make_repo(tmp_path / "anon", commit=False)
    anonymous.git("config", "--unset", "user.name")
    anonymous.git("config", "--unset", "user.email")
    assert GitRepo.discover(anonymous.path).identity() == "unknown"


def test_worktree_root_without_git(repo: Repo, tmp_path: Path) -> None:
    sub = repo.path / "a"
    sub.mkdir()
    assert worktree_root(sub) == repo.path.resolve()
    outside = tmp_path / "plain"
    outside.mkdir()
    with pytest.raises(GitError, match="not inside a git repository"):
        worktree_root(outside)


def test_holds_tracked_files(repo: Repo) -> None:
    (repo.path / "src").mkdir()
    (repo.path / "src" / "x.py").write_text("x = 1\n")
    (repo.path / "empty").mkdir()
    repo.commit_all("src")
    assert holds_tracked_files(repo.path, repo.path / "src")
    assert not holds_tracked_files(repo.path, repo.path / "empty")
    assert not holds_tracked_files(repo.path, repo.path / "not-made")
