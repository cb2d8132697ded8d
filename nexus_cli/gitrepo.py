"""The few facts NexusML needs from git: where the repository is, HEAD, and whether it is clean."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

from nexus_cli.errors import GitError
from nexus_cli.files import is_temp_file

#: seconds one git query may take before the command gives up on it
GIT_TIMEOUT = 60
#: git's environment: English messages (matched below), and no index refresh written
#: back by `git status` (it would take .git/index.lock under a user's own git command)
_GIT_ENV = {"LC_ALL": "C", "GIT_OPTIONAL_LOCKS": "0"}


class _GitQuery:
    """One ``git`` command, started at once and read when its answer is needed."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.args = args
        try:
            self._process: subprocess.Popen | None = subprocess.Popen(
                ["git", *args],
                cwd=cwd,
                env={**os.environ, **_GIT_ENV},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        except OSError as exc:
            raise GitError(f"git is not usable here: {exc.strerror or exc}") from exc
        self._answer: tuple[int, bytes, str] | None = None

    def answer(self) -> tuple[int, bytes, str]:
        """``(exit status, stdout, stderr's first line)``, waiting for git if need be."""
        if self._answer is None:
            assert self._process is not None
            try:
                out, err = self._process.communicate(timeout=GIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.close()
                raise GitError(
                    f"`git {' '.join(self.args[:2])}` did not finish within {GIT_TIMEOUT} s"
                ) from None
            first = err.decode(errors="replace").strip().splitlines()
            self._answer = (self._process.returncode, out, first[0] if first else "")
            self._process = None
        return self._answer

    def close(self) -> None:
        """Stop git if its answer was never read (the command failed before it needed it)."""
        if self._process is not None:
            self._process.kill()
            self._process.communicate()
            self._process = None


class GitRepo:
    """The git facts of one command: the work tree's root, HEAD, the uncommitted changes
    and the user's identity.

    Three ``git`` processes are started together by ``start`` and read when a fact is
    first asked for, so git works while Python goes on (`nexus store` loads its storage
    SDK meanwhile). The answers are a snapshot of the moment they were asked for. No
    GitPython: importing it and the processes it runs first cost more than the queries.
    """

    def __init__(self, start: Path) -> None:
        self.start_dir = start
        self._queries: list[_GitQuery] = []
        try:
            self._toplevel = self._query(["rev-parse", "--show-toplevel"])
            self._status = self._query(
                ["status", "--porcelain=v2", "--branch", "-z", "--untracked-files=all"]
            )
            self._user = self._query(["config", "-z", "--get-regexp", r"^user\.(name|email)$"])
        except BaseException:
            self.close()
            raise

    def _query(self, args: list[str]) -> _GitQuery:
        query = _GitQuery(args, self.start_dir)
        self._queries.append(query)
        return query

    @classmethod
    def start(cls, start: Path | None = None) -> GitRepo:
        """Start the queries for the repository that holds ``start`` (default: the current
        directory, or the nearest existing folder above a path yet to be made)."""
        folder = (start or Path.cwd()).resolve()
        while not folder.is_dir() and folder != folder.parent:
            folder = folder.parent
        return cls(folder)

    @classmethod
    def discover(cls, start: Path | None = None) -> GitRepo:
        """``start``, and wait for the root: ``GitError`` when there is no work tree."""
        repo = cls.start(start)
        try:
            _ = repo.root
        except BaseException:
            repo.close()
            raise
        return repo

    def close(self) -> None:
        for query in self._queries:
            query.close()

    def __enter__(self) -> GitRepo:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @functools.cached_property
    def root(self) -> Path:
        """The top folder of the work tree; ``GitError`` outside one."""
        code, out, error = self._toplevel.answer()
        if code != 0:
            raise self._not_a_worktree(error)
        return Path(os.fsdecode(out.rstrip(b"\n"))).resolve()

    def _not_a_worktree(self, error: str) -> GitError:
        if "not a git repository" in error:
            return GitError(
                f"{self.start_dir} is not inside a git repository",
                hint="run `git init` and commit, or pass --meta",
            )
        if "work tree" in error:
            return GitError(
                f"{self.start_dir} is in a bare repository or a .git folder; "
                "run nexus in a working tree"
            )
        return GitError(f"git cannot read the repository at {self.start_dir}: {error}")

    @functools.cached_property
    def _head_and_changes(self) -> tuple[str | None, list[tuple[str, str]]]:
        root = self.root  # the clearer error first
        code, out, error = self._status.answer()
        if code != 0:
            raise GitError(f"git status failed in {root}: {error}")
        return _parse_status(out)

    def head_commit(self) -> str:
        """The full hash of HEAD, or ``GitError`` before the first commit."""
        head, _ = self._head_and_changes
        if head is None:
            raise GitError(
                f"the repository at {self.root} has no commit yet",
                hint="commit your code first: the model version is tied to a commit",
            )
        return head

    def dirty_paths(self, allowed: set[Path] = frozenset()) -> list[str]:
        """Paths with uncommitted changes or untracked files that git does not ignore.

        Paths in ``allowed`` (absolute) are left out: a change to the metadata file
        alone never blocks a store. So are untracked temp files of another nexus
        process writing at this moment (``.<name>.<random>.incomplete``).
        """
        _, changes = self._head_and_changes
        allowed_relative = set()
        for path in allowed:
            try:
                allowed_relative.add(path.resolve().relative_to(self.root).as_posix())
            except ValueError:
                continue
        return [
            path
            for kind, path in changes
            if path not in allowed_relative and not (kind == "?" and is_temp_file(path))
        ]

    def identity(self) -> str:
        """``Name <email>`` from git's configuration, or ``unknown``."""
        _, out, _ = self._user.answer()  # exit 1: neither is set
        values: dict[str, str] = {}
        for item in out.split(b"\0"):
            key, _, value = item.partition(b"\n")
            values[key.decode(errors="replace")] = value.decode(errors="replace")  # last wins
        name, email = values.get("user.name", ""), values.get("user.email", "")
        if name and email:
            return f"{name} <{email}>"
        return name or email or "unknown"


def _parse_status(output: bytes) -> tuple[str | None, list[tuple[str, str]]]:
    """HEAD's hash (``None`` before the first commit) and ``(kind, path)`` per change
    from ``git status --porcelain=v2 --branch -z``: kind ``1`` changed, ``2`` renamed or
    copied, ``u`` unmerged, ``?`` untracked; paths relative to the root."""
    head = None
    changes = []
    entries = iter(output.split(b"\0"))
    for raw in entries:
        entry = os.fsdecode(raw)
        if entry.startswith("# branch.oid "):
            oid = entry.removeprefix("# branch.oid ")
            head = None if oid == "(initial)" else oid
        elif entry[:2] in _FIELDS_BEFORE_PATH:
            kind = entry[0]
            changes.append((kind, entry.split(" ", _FIELDS_BEFORE_PATH[entry[:2]])[-1]))
            if kind == "2":
                next(entries, None)  # the source path of the rename follows; the target is enough
    return head, changes


#: how many space-separated fields come before the path in each kind of status line
_FIELDS_BEFORE_PATH = {"1 ": 8, "2 ": 9, "u ": 10, "? ": 1}


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
