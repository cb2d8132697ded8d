"""Shared fixtures: hermetic environment, real git repositories in tmp dirs, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nexus_cli.cli import app

# Variables that could leak a developer's real setup into a test.
_LEAKY_PREFIXES = ("AWS_", "NEXUS_", "GOOGLE_", "STORAGE_EMULATOR_HOST", "GIT_")
_LEAKY_NAMES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy")


@pytest.fixture(autouse=True)
def hermetic_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every test starts with no credentials, no proxies, no user git config, no colour."""
    for name in list(os.environ):
        if name.startswith(_LEAKY_PREFIXES) or name in _LEAKY_NAMES:
            monkeypatch.delenv(name, raising=False)
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "160")
    monkeypatch.setenv("TERM", "dumb")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


@dataclass
class Repo:
    """A real git repository in a tmp dir, with a user and one commit."""

    path: Path

    def git(self, *args: str) -> str:
        return git(self.path, *args)

    def commit(self, message: str = "change", filename: str = "code.py") -> str:
        """Change a tracked file, commit, and return the new HEAD."""
        target = self.path / filename
        with open(target, "a", encoding="utf-8") as handle:
            handle.write(f"# {message}\n")
        self.git("add", filename)
        self.git("commit", "-q", "-m", message)
        return self.head()

    def commit_all(self, message: str = "nexus metadata") -> str:
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)
        return self.head()

    def head(self) -> str:
        return self.git("rev-parse", "HEAD")

    @property
    def meta(self) -> dict:
        return json.loads((self.path / ".nexus_meta.json").read_text())

    def write_weights(self, name: str, data: bytes) -> Path:
        """A weights file outside the tracked tree (git-ignored), as a training job leaves it."""
        path = self.path / "out" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        return path


def make_repo(path: Path, *, commit: bool = True) -> Repo:
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", "main")
    git(path, "config", "user.name", "Ada Lovelace")
    git(path, "config", "user.email", "ada@example.com")
    git(path, "config", "commit.gpgsign", "false")
    repo = Repo(path)
    (path / ".gitignore").write_text("out/\n")
    if commit:
        repo.git("add", ".gitignore")
        repo.git("commit", "-q", "-m", "initial")
    return repo


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Repo:
    """A committed repository, also the current directory."""
    made = make_repo(tmp_path / "project")
    monkeypatch.chdir(made.path)
    return made


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def json(self):
        return json.loads(self.stdout)


@pytest.fixture
def cli():
    """Run `nexus` in-process through Typer's runner; stdout and stderr kept apart."""
    runner = CliRunner()

    def invoke(*args: str) -> Result:
        outcome = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        return Result(outcome.exit_code, outcome.stdout, outcome.stderr)

    return invoke


def run_nexus(*args: str, cwd: Path, env: dict | None = None, timeout: float = 120) -> Result:
    """Run the installed `nexus` console script as a separate process."""
    completed = subprocess.run(
        [sys.executable, "-m", "nexus_cli", *[str(a) for a in args]],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Result(completed.returncode, completed.stdout, completed.stderr)
