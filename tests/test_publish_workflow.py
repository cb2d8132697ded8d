"""The publish workflow's shell steps, run as they are written in
.github/workflows/publish-model.yml, in a tmp git repository with a bare "origin", against
the moto S3 server on 127.0.0.1: store, commit back, push; a lost race rebased and retried;
every failure a non-zero exit with nothing pushed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import git, make_repo

pytest_plugins = ["tests.cloud_servers"]

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "publish-model.yml"
EMPTY_REGISTRY = '{\n  "schema_version": 1,\n  "models": {}\n}\n'


def workflow_job() -> dict[str, Any]:
    return yaml.safe_load(WORKFLOW.read_text())["jobs"]["publish"]


def step_script(step_id: str) -> str:
    (step,) = (s for s in workflow_job()["steps"] if s.get("id") == step_id)
    assert "${{" not in step["run"], "run steps take expressions through env only"
    return step["run"]


def workflow_env() -> dict[str, str]:
    """The job's env, less what GitHub fills in from repository settings."""
    return {k: str(v) for k, v in workflow_job()["env"].items() if "${{" not in str(v)}


@dataclass
class Job:
    """One run of the publish job: a fresh checkout of ``commit`` on main."""

    path: Path
    env: dict[str, str]

    def step(self, step_id: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-e", "-c", step_script(step_id)], cwd=self.path, env=self.env,
            capture_output=True, text=True, timeout=240,
        )  # fmt: skip

    def run(self) -> subprocess.CompletedProcess[str]:
        built = self.step("build")
        assert built.returncode == 0, built.stderr
        return self.step("publish")


@dataclass
class Project:
    origin: Path
    seed: Path
    tmp: Path
    env: dict[str, str]

    def push_change(self, message: str) -> str:
        """A merge to main: a code change pushed to origin; returns its commit."""
        git(self.seed, "pull", "-q", "--rebase", "origin", "main")
        (self.seed / "train.py").write_text(f"# {message}\n")
        git(self.seed, "add", "train.py")
        git(self.seed, "commit", "-q", "-m", message)
        git(self.seed, "push", "-q", "origin", "HEAD:main")
        return git(self.seed, "rev-parse", "HEAD")

    def job(self, commit: str, name: str, **env: str) -> Job:
        path = self.tmp / name
        git(self.tmp, "clone", "-q", str(self.origin), str(path))
        git(path, "checkout", "-q", "-B", "main", commit)
        runner_temp = self.tmp / f"{name}-runner-temp"
        runner_temp.mkdir()
        return Job(path, {**self.env, "RUNNER_TEMP": str(runner_temp), **env})

    def head(self) -> str:
        return git(self.origin, "rev-parse", "main")

    def registry(self) -> dict[str, Any]:
        return json.loads(git(self.origin, "show", "main:.nexus_meta.json"))

    def versions(self) -> list[dict[str, Any]]:
        return self.registry()["models"]["demo_model"]["versions"]


@pytest.fixture
def project(tmp_path: Path, moto_endpoint: str, s3_bucket: str, aws_env: dict[str, str]):
    """origin.git holding a project laid out like this one, and the job's environment."""
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], check=True)
    seed = make_repo(tmp_path / "seed", commit=False).path
    (seed / "scripts").mkdir()
    for name in ("publish_model.sh", "demo_model.py"):
        shutil.copy2(ROOT / "scripts" / name, seed / "scripts" / name)
    shutil.copy2(ROOT / ".gitattributes", seed / ".gitattributes")
    (seed / ".nexus_meta.json").write_text(EMPTY_REGISTRY)
    git(seed, "add", ".")
    git(seed, "commit", "-q", "-m", "project with the publish workflow")
    git(seed, "remote", "add", "origin", str(origin))
    git(seed, "push", "-q", "origin", "main")
    env = {
        **os.environ,
        **workflow_env(),
        **aws_env,
        # what the workflow's ${{ vars.* }} give, plus the S3 server on 127.0.0.1
        "NEXUS_BUCKET": s3_bucket,
        "NEXUS_REGION": "us-east-1",
        "NEXUS_ENDPOINT_URL": moto_endpoint,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PUBLISH_RETRY_DELAY_S": "0",
    }
    return Project(origin, seed, tmp_path, env)


def test_publish_stores_the_model_and_commits_the_registry_back(project: Project, s3_client):
    commit = project.push_change("train v1")
    result = project.job(commit, "job").run()
    assert result.returncode == 0, result.stderr

    stored = json.loads(result.stdout)
    assert stored["uploaded"] is True
    assert stored["commit_hash"] == commit
    (version,) = project.versions()
    assert version["commit_hash"] == commit
    assert version["is_latest"] is True
    assert version["format"] == "torchscript"
    head = project.head()
    assert git(project.origin, "rev-parse", "main~1") == commit
    assert "[skip ci]" in git(project.origin, "log", "-1", "--format=%s", "main")
    changed = git(project.origin, "diff-tree", "--no-commit-id", "--name-only", "-r", head)
    assert changed == ".nexus_meta.json", "the metadata commit touches nothing else"
    author = git(project.origin, "log", "-1", "--format=%an", "main")
    assert author == "github-actions[bot]"
    listed = s3_client.list_objects_v2(Bucket=project.env["NEXUS_BUCKET"])
    assert [o["Key"] for o in listed["Contents"]] == [version["storage_uri"]]


def test_rerunning_the_job_for_the_same_commit_pushes_nothing(project: Project) -> None:
    commit = project.push_change("train v1")
    assert project.job(commit, "first").run().returncode == 0
    published = project.head()
    again = project.job(commit, "rerun").run()
    assert again.returncode == 0, again.stderr
    assert "already published" in again.stderr
    assert project.head() == published


def test_a_push_that_lost_the_race_is_rebased_and_retried(project: Project) -> None:
    first = project.push_change("train v1")
    slow = project.job(first, "slow")  # checked out before the next merge landed
    second = project.push_change("train v2")
    fast = project.job(second, "fast")
    assert fast.run().returncode == 0
    fast_head = project.head()

    result = slow.run()
    assert result.returncode == 0, result.stderr
    assert "push rejected (attempt 1 of 5)" in result.stderr
    assert git(project.origin, "rev-parse", "main~1") == fast_head, "rebased, not merged"
    versions = project.versions()
    assert {v["commit_hash"] for v in versions} == {first, second}
    assert sum(v["is_latest"] for v in versions) == 1


def test_a_failing_nexus_store_fails_the_job_with_its_exit_code(project: Project) -> None:
    commit = project.push_change("train v1")
    before = project.head()
    job = project.job(commit, "job", NEXUS_BUCKET="no-such-bucket-here")
    result = job.run()
    assert result.returncode == 6, result.stderr  # SPEC: storage error
    assert "nexus store failed with exit code 6" in result.stderr
    assert project.head() == before


def test_a_dirty_checkout_fails_the_job(project: Project) -> None:
    commit = project.push_change("train v1")
    before = project.head()
    job = project.job(commit, "job")
    (job.path / "notes.txt").write_text("left behind by an earlier step\n")
    result = job.run()
    assert result.returncode == 3, result.stderr  # SPEC: git problem
    assert project.head() == before


def test_push_retries_are_bounded(project: Project) -> None:
    commit = project.push_change("train v1")
    before = project.head()
    hook = project.origin / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho 'protected branch' >&2\nexit 1\n")
    hook.chmod(0o755)
    job = project.job(commit, "job", PUBLISH_MAX_ATTEMPTS="2")
    result = job.run()
    assert result.returncode == 1
    assert "rejected after 2 attempts" in result.stderr
    assert project.head() == before
