"""The few facts NexusML needs from git: where the repository is, HEAD, and whether it is clean."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from nexus_cli.errors import GitError
from nexus_cli.files import is_temp_file


def _git():
    """Import GitPython lazily: it costs startup time and needs a git executable."""
    try:
        import git
    except ImportError as exc:  # GitPython raises ImportError when no git executable is found
        raise GitError(f"git is not usable here: {exc}") from exc
    return git


@dataclass(frozen=True)
class GitRepo:
    """A git working tree, opened once per command."""

    root: Path
    _repo: object

    @classmethod
    def discover(cls, start: Path | None = None) -> GitRepo:
        """Open the repository that holds ``start`` (default: the current directory)."""
        git = _git()
        start = (start or Path.cwd()).resolve()
        while not start.exists() and start != start.parent:
            start = start.parent  # a metadata folder that is yet to be made
        try:
            repo = git.Repo(start, search_parent_directories=True)
        except (git.InvalidGitRepositoryError, git.NoSuchPathError) as exc:
            raise GitError(
                f"{start} is not inside a git repository",
                hint="run `git init` and commit, or pass --meta",
            ) from exc
        if repo.bare or repo.working_tree_dir is None:
            raise GitError(f"{repo.git_dir} is a bare repository; run nexus in a working tree")
        return cls(Path(repo.working_tree_dir).resolve(), repo)

    def head_commit(self) -> str:
        """The full hash of HEAD, or ``GitError`` before the first commit."""
        try:
            return self._repo.head.commit.hexsha
        except ValueError as exc:
            raise GitError(
                f"the repository at {self.root} has no commit yet",
                hint="commit your code first: the model version is tied to a commit",
            ) from exc

    def dirty_paths(self, allowed: set[Path] = frozenset()) -> list[str]:
        """Paths with uncommitted changes or untracked files that git does not ignore.

        Paths in ``allowed`` (absolute) are left out: a change to the metadata file
        alone never blocks a store. So are untracked temp files of another nexus
        process writing at this moment (``.<name>.<random>.incomplete``).
        """
        git = _git()
        try:
            output = self._repo.git.status("--porcelain=v1", "-z", "--untracked-files=all")
        except git.GitCommandError as exc:
            raise GitError(f"git status failed in {self.root}: {exc.stderr.strip()}") from exc
        allowed_relative = set()
        for path in allowed:
            try:
                allowed_relative.add(path.resolve().relative_to(self.root).as_posix())
            except ValueError:
                continue
        dirty = []
        entries = iter(output.split("\0"))
        for entry in entries:
            if not entry:
                continue
            status, path = entry[:2], entry[3:]
            if "R" in status or "C" in status:
                next(entries, None)  # the rename's source path follows; the target is enough
            if path in allowed_relative or (status == "??" and is_temp_file(path)):
                continue
            dirty.append(path)
        return dirty

    def identity(self) -> str:
        """``Name <email>`` from git's configuration, or ``unknown``."""
        reader = self._repo.config_reader()
        name = reader.get_value("user", "name", default="")
        email = reader.get_value("user", "email", default="")
        if name and email:
            return f"{name} <{email}>"
        return str(name or email or "unknown")


def find_worktree_root(path: Path) -> Path | None:
    """The nearest folder at or above ``path`` that holds a ``.git`` entry, or ``None``.

    A cheap look at the file system, without GitPython or a git process.
    """
    for folder in (path, *path.parents):
        if (folder / ".git").exists():
            return folder
    return None


def worktree_root(start: Path | None = None) -> Path:
    """The top folder of the git work tree that holds ``start`` (default: the current
    directory), found by looking for ``.git``: no GitPython import, no git process."""
    start = (start or Path.cwd()).resolve()
    root = find_worktree_root(start)
    if root is None:
        raise GitError(
            f"{start} is not inside a git repository",
            hint="run `git init` and commit, or pass --meta",
        )
    return root


def holds_tracked_files(worktree: Path, folder: Path) -> bool:
    """Whether git tracks any file at or under ``folder`` in the work tree ``worktree``.

    Best effort: where git cannot answer (no git executable, as in a serving image, or a
    repository git refuses to read) it is ``False``: files git cannot see it cannot hide.
    """
    try:
        completed = subprocess.run(
            ["git", "-C", str(worktree), "ls-files", "-z", "--", str(folder)],
            capture_output=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return completed.returncode == 0 and bool(completed.stdout)
