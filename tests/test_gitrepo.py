"""The git facts nexus relies on, from real repositories."""

from __future__ import annotations

from pathlib import Path

import pytest

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


def test_no_commit_yet(tmp_path: Path) -> None:
    fresh = make_repo(tmp_path / "fresh", commit=False)
    with pytest.raises(GitError, match="no commit yet"):
        GitRepo.discover(fresh.path).head_commit()


def test_dirty_paths(repo: Repo) -> None:
    git_repo = GitRepo.discover(repo.path)
    assert git_repo.dirty_paths() == []
    (repo.path / "out").mkdir()
    (repo.path / "out" / "weights.pt").write_bytes(b"ignored by .gitignore")
    assert git_repo.dirty_paths() == []
    (repo.path / "new.txt").write_text("untracked\n")
    (repo.path / ".gitignore").write_text("out/\n# edited\n")
    assert sorted(git_repo.dirty_paths()) == [".gitignore", "new.txt"]
    assert git_repo.dirty_paths({repo.path / ".gitignore"}) == ["new.txt"]


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
