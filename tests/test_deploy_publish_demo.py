"""`make publish-demo` and the compose stack's model server, without Docker: the script runs
against the moto S3 server standing in for MinIO, and a real model server runs with the
environment docker-compose.yml gives it (its endpoint pointed at moto)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.cloud_servers import free_port, wait_for_http
from tests.conftest import git, make_repo
from tests.test_deploy import compose_model

pytest_plugins = ["tests.cloud_servers"]

ROOT = Path(__file__).resolve().parent.parent
EMPTY_REGISTRY = (ROOT / ".nexus_meta.json").read_text()


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """A clone of this project as publish_demo.sh sees it: scripts, .gitignore, registry."""
    repo = make_repo(tmp_path / "nexusml", commit=False).path
    shutil.copytree(ROOT / "scripts", repo / "scripts", ignore=shutil.ignore_patterns("__py*"))
    shutil.copy2(ROOT / ".gitignore", repo / ".gitignore")
    (repo / ".nexus_meta.json").write_text(EMPTY_REGISTRY)
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "a clone of nexusml")
    return repo


def publish(clone: Path, endpoint: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "scripts/publish_demo.sh"],
        cwd=clone,
        env={
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "NEXUS_PUBLISH_ENDPOINT_URL": endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=180,
    )


def minio_env(bucket: str) -> dict[str, str]:
    """What .env gives publish_demo.sh and the compose stack alike (moto takes any keys)."""
    return {"NEXUS_BUCKET": bucket, "MINIO_ROOT_USER": "testing", "MINIO_ROOT_PASSWORD": "testing"}


def dot_env(bucket: str) -> str:
    return "".join(f"{name}={value}\n" for name, value in minio_env(bucket).items())


def test_publish_demo_stores_in_the_bucket_and_records_the_version(
    clone: Path, moto_endpoint: str, s3_bucket: str, s3_client
) -> None:
    result = publish(clone, moto_endpoint, **minio_env(s3_bucket))
    assert result.returncode == 0, result.stderr + result.stdout
    assert "docker compose restart model-server" in result.stdout
    (version,) = json.loads((clone / ".nexus_meta.json").read_text())["models"]["demo_model"][
        "versions"
    ]
    assert version["commit_hash"] == git(clone, "rev-parse", "HEAD")
    assert version["signature"]["inputs"][0]["shape"] == [-1, 8]
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == [version["storage_uri"]]
    assert git(clone, "status", "--porcelain") == "M .nexus_meta.json", "only the registry"

    again = publish(clone, moto_endpoint, **minio_env(s3_bucket))
    assert again.returncode == 0, again.stderr
    assert json.loads((clone / ".nexus_meta.json").read_text())["models"]["demo_model"][
        "versions"
    ] == [version]


def test_publish_demo_reads_dot_env(clone: Path, moto_endpoint: str, s3_bucket: str) -> None:
    (clone / ".env").write_text(dot_env(s3_bucket))  # git-ignored: the tree stays clean
    result = publish(clone, moto_endpoint)
    assert result.returncode == 0, result.stderr
    assert f"s3://{s3_bucket}" in result.stdout


def test_publish_demo_refuses_a_dirty_clone(
    clone: Path, moto_endpoint: str, s3_bucket: str
) -> None:
    (clone / "scripts" / "demo.sh").write_text("# local edit\n")
    result = publish(clone, moto_endpoint, **minio_env(s3_bucket))
    assert result.returncode == 3, result.stderr  # SPEC: git problem
    assert "scripts/demo.sh" in result.stderr
    assert json.loads((clone / ".nexus_meta.json").read_text())["models"] == {}


def test_publish_demo_with_no_minio_fails_with_a_storage_error(clone: Path) -> None:
    result = publish(clone, f"http://127.0.0.1:{free_port()}", **minio_env("nexus-models"))
    assert result.returncode == 6, result.stderr  # SPEC: storage or credentials error


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.slow
def test_compose_model_server_env_serves_what_publish_demo_published(
    clone: Path, moto_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    """The model server with docker-compose.yml's environment (MinIO endpoint swapped for
    moto, the mount for the clone's registry): not ready before publish-demo, naming it;
    ready with the published version after a restart, as the README says."""
    compose_dir = tmp_path / "compose"
    compose_dir.mkdir()
    for name in ("docker-compose.yml", ".nexus_meta.json"):
        shutil.copy2(ROOT / name, compose_dir / name)
    shutil.copytree(ROOT / "deploy", compose_dir / "deploy")
    (compose_dir / ".env").write_text(dot_env(s3_bucket))
    service = compose_model(compose_dir)["services"]["model-server"]
    env = {k: v for k, v in service["environment"].items() if v}
    port = free_port()
    env |= {
        "NEXUS_ENDPOINT_URL": moto_endpoint,  # http://minio:9000 inside the stack
        "NEXUS_META": str(clone / ".nexus_meta.json"),  # the bind mount's source
        "NEXUS_CACHE_DIR": str(tmp_path / "cache"),
        "NEXUS_HOST": "127.0.0.1",
        "NEXUS_PORT": str(port),
        "NEXUS_DEVICE": "cpu",
    }
    server_env = {"PATH": os.environ["PATH"], "HOME": os.environ["HOME"], **env}
    url = f"http://127.0.0.1:{port}"

    def start() -> subprocess.Popen:
        log = open(tmp_path / "server.log", "ab")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen([sys.executable, "-m", "model_server"], env=server_env,
                                   stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)  # fmt: skip
        log.close()
        wait_for_http(f"{url}/health", timeout=60)
        return process

    process = start()
    try:
        status, body = _get(f"{url}/readyz")
        assert status == 503
        assert "make publish-demo" in json.dumps(body)

        result = publish(clone, moto_endpoint, **minio_env(s3_bucket))
        assert result.returncode == 0, result.stderr
        process.terminate()
        process.wait(timeout=30)
        process = start()  # docker compose restart model-server
        deadline = time.monotonic() + 60  # only catches a hang
        while (status := _get(f"{url}/readyz")[0]) != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status == 200, _get(f"{url}/readyz")
        _, metadata = _get(f"{url}/v1/metadata")
        assert metadata["model"]["commit_hash"] == git(clone, "rev-parse", "HEAD")
    finally:
        process.terminate()
        process.wait(timeout=30)
