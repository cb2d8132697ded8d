"""`nexus` against cloud stores on 127.0.0.1: round trips, races, kills, corruption, errors."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pty
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from nexus_cli.storage.s3 import DEFAULT_PART_SIZE
from tests.conftest import Repo, Result, run_nexus

pytest_plugins = ["tests.cloud_servers"]

MiB = 1024 * 1024
#: just above the CLI's default multipart threshold (64 MiB): a five-part upload
MULTIPART_SIZE = 64 * MiB + 1234


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def spawn_nexus(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `nexus` as its own process and return at once."""
    return subprocess.Popen(
        [sys.executable, "-m", "nexus_cli", *[str(a) for a in args]],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def assert_one_line_error(result: Any, *needles: str) -> None:
    """Exit 6 with one line on stderr that says what to check, never a traceback."""
    assert result.exit_code == 6, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch, s3_bucket: str, moto_endpoint: str) -> dict:
    settings = {"NEXUS_PROVIDER": "s3", "NEXUS_BUCKET": s3_bucket,
                "NEXUS_ENDPOINT_URL": moto_endpoint}  # fmt: skip
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    return settings


@pytest.fixture(params=["s3", "minio", "gcs"])
def provider_env(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> dict:
    """NEXUS_* settings for each provider, on its fake server; MinIO is S3 with an endpoint."""
    if request.param == "gcs":
        settings = {"NEXUS_PROVIDER": "gcs", "NEXUS_BUCKET": request.getfixturevalue("gcs_bucket")}
    else:
        settings = {
            "NEXUS_PROVIDER": request.param,
            "NEXUS_BUCKET": request.getfixturevalue("s3_bucket"),
            "NEXUS_ENDPOINT_URL": request.getfixturevalue("moto_endpoint"),
        }
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    return settings


# round trips ----------------------------------------------------------------------------


def test_store_list_load_rollback_load_verify(repo: Repo, cli, provider_env: dict) -> None:
    v1, v2 = os.urandom(300_000), os.urandom(500_000)
    first = cli("store", repo.write_weights("model.pt", v1), "prod_model", "-m", "v1", "--json")
    assert first.exit_code == 0, first.stderr
    assert first.json["uploaded"] is True
    c1 = repo.head()
    repo.commit_all("nexus: store v1")
    c2 = repo.commit("train v2")
    second = cli("store", repo.write_weights("model.pt", v2), "prod_model", "--json")
    assert second.exit_code == 0, second.stderr
    assert second.json["storage_uri"] == f"prod_model/{c2}.pt"
    again = cli("store", repo.write_weights("model.pt", v2), "prod_model", "--json")
    assert again.exit_code == 0
    assert again.json["uploaded"] is False

    listed = cli("list", "prod_model", "--json")
    assert [v["commit_hash"] for v in listed.json] == [c2, c1]
    assert [v["is_latest"] for v in listed.json] == [True, False]

    loaded = cli("load", "prod_model", "-o", repo.path / "out" / "latest.pt", "--json")
    assert loaded.exit_code == 0, loaded.stderr
    assert Path(loaded.json["path"]).read_bytes() == v2

    rolled = cli("rollback", "prod_model", "--json")
    assert rolled.json == {"model_name": "prod_model", "from_commit": c2, "to_commit": c1}
    reloaded = cli("load", "prod_model", "-o", repo.path / "out" / "previous.pt", "--json")
    assert reloaded.exit_code == 0, reloaded.stderr
    assert Path(reloaded.json["path"]).read_bytes() == v1
    assert reloaded.json["commit_hash"] == c1

    verified = cli("verify", "--json")
    assert verified.exit_code == 0, verified.stdout
    assert verified.json["counts"] == {"ok": 2, "missing": 0, "mismatch": 0}


@pytest.mark.slow
def test_multipart_round_trip_through_the_cli(repo: Repo, cli, s3_env: dict, s3_client) -> None:
    data = os.urandom(MULTIPART_SIZE)
    stored = cli("store", repo.write_weights("big.pt", data), "big", "--json")
    assert stored.exit_code == 0, stored.stderr
    head = s3_client.head_object(Bucket=s3_env["NEXUS_BUCKET"], Key=stored.json["storage_uri"])
    parts = -(-MULTIPART_SIZE // DEFAULT_PART_SIZE)
    assert head["ETag"].endswith(f'-{parts}"')  # sent in parts of the default size
    loaded = cli("load", "big", "-o", repo.path / "out" / "copy.pt", "--json")
    assert loaded.exit_code == 0, loaded.stderr
    assert sha256(Path(loaded.json["path"]).read_bytes()) == sha256(data)
    assert cli("verify", "--json").json["counts"]["ok"] == 1


# one winner per key ---------------------------------------------------------------------


def finish(processes: list, timeout: float) -> list[tuple[int, str, str]]:
    """``(exit code, stdout, stderr)`` of each process, read without risk of a full pipe."""
    outcomes = []
    for process in processes:
        out, err = process.communicate(timeout=timeout)
        outcomes.append((process.returncode, out, err))
    return outcomes


@pytest.mark.slow
def test_eight_writers_of_different_bytes_have_one_winner(
    repo: Repo, s3_env: dict, s3_client
) -> None:
    """Six small files race two multipart ones: one exits 0, seven exit 5, nothing lingers."""
    sizes = [MULTIPART_SIZE if i in (2, 5) else 1 * MiB + i for i in range(8)]
    payloads = [os.urandom(size) for size in sizes]
    files = [repo.write_weights(f"w{i}.pt", data) for i, data in enumerate(payloads)]
    writers = [spawn_nexus("store", f, "racer", "--json", cwd=repo.path) for f in files]
    outcomes = finish(writers, timeout=240)

    codes = [code for code, _, _ in outcomes]
    assert sorted(codes) == [0] + [5] * 7, [err for _, _, err in outcomes]
    winner = codes.index(0)
    record = json.loads(outcomes[winner][1])
    assert record["sha256"] == sha256(payloads[winner])
    assert record["uploaded"] is True
    for code, _, err in outcomes:
        if code == 5:
            assert "different bytes are already stored" in err
            assert "Traceback" not in err
    key = f"racer/{repo.head()}.pt"
    body = s3_client.get_object(Bucket=s3_env["NEXUS_BUCKET"], Key=key)["Body"].read()
    assert sha256(body) == sha256(payloads[winner])
    assert [v["sha256"] for v in repo.meta["models"]["racer"]["versions"]] == [record["sha256"]]
    assert not s3_client.list_multipart_uploads(Bucket=s3_env["NEXUS_BUCKET"]).get("Uploads")


def test_two_writers_of_the_same_bytes_both_succeed_with_one_upload(
    repo: Repo, s3_env: dict
) -> None:
    weights = repo.write_weights("same.pt", os.urandom(2 * MiB))
    writers = [spawn_nexus("store", weights, "twin", "--json", cwd=repo.path) for _ in range(2)]
    outcomes = finish(writers, timeout=120)
    assert [code for code, _, _ in outcomes] == [0, 0], [err for _, _, err in outcomes]
    uploaded = sorted(json.loads(out)["uploaded"] for _, out, _ in outcomes)
    assert uploaded == [False, True]
    assert len(repo.meta["models"]["twin"]["versions"]) == 1


# interrupted uploads --------------------------------------------------------------------


def _start_slow_multipart_store(repo: Repo, s3_env: dict, s3_client, link: Any):
    """`nexus store` of a five-part file over a slow link, returned once parts are moving."""
    data = os.urandom(MULTIPART_SIZE)
    weights = repo.write_weights("big.pt", data)
    writer = spawn_nexus(
        "store", weights, "big", "--json", cwd=repo.path, env={"NEXUS_ENDPOINT_URL": link.url}
    )
    deadline = time.monotonic() + 60
    while not s3_client.list_multipart_uploads(Bucket=s3_env["NEXUS_BUCKET"]).get("Uploads"):
        assert writer.poll() is None, writer.communicate()
        assert time.monotonic() < deadline, "the multipart upload never started"
        time.sleep(0.02)
    time.sleep(0.5)  # parts are on the wire now
    assert writer.poll() is None, "the upload finished before it could be interrupted"
    return data, weights, writer


def _assert_nothing_stored(repo: Repo, bucket: str, s3_client) -> None:
    assert s3_client.list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    meta = repo.path / ".nexus_meta.json"
    assert not meta.exists() or "big" not in json.loads(meta.read_text())["models"]


@pytest.mark.slow
def test_a_store_killed_mid_multipart_leaves_nothing_and_can_be_rerun(
    repo: Repo, s3_env: dict, s3_client, moto_endpoint: str, slow_link
) -> None:
    link = slow_link(int(moto_endpoint.rsplit(":", 1)[1]), 6 * MiB)
    data, weights, writer = _start_slow_multipart_store(repo, s3_env, s3_client, link)
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    _assert_nothing_stored(repo, s3_env["NEXUS_BUCKET"], s3_client)
    # A killed process cannot abort: its parts wait for the bucket's lifecycle rule
    # (AbortIncompleteMultipartUpload), invisible to readers and to `nexus list`.
    assert len(s3_client.list_multipart_uploads(Bucket=s3_env["NEXUS_BUCKET"])["Uploads"]) == 1

    again = run_nexus("store", weights, "big", "--json", cwd=repo.path)
    assert again.exit_code == 0, again.stderr
    assert again.json["uploaded"] is True
    assert again.json["sha256"] == sha256(data)
    loaded = run_nexus("load", "big", "-o", repo.path / "out" / "back.pt", cwd=repo.path)
    assert loaded.exit_code == 0, loaded.stderr
    assert sha256((repo.path / "out" / "back.pt").read_bytes()) == sha256(data)


@pytest.mark.slow
def test_ctrl_c_mid_multipart_aborts_the_upload(
    repo: Repo, s3_env: dict, s3_client, moto_endpoint: str, slow_link
) -> None:
    link = slow_link(int(moto_endpoint.rsplit(":", 1)[1]), 6 * MiB)
    _, _, writer = _start_slow_multipart_store(repo, s3_env, s3_client, link)
    writer.send_signal(signal.SIGINT)
    code = writer.wait(timeout=60)
    assert code == 130, writer.communicate()
    _assert_nothing_stored(repo, s3_env["NEXUS_BUCKET"], s3_client)
    assert not s3_client.list_multipart_uploads(Bucket=s3_env["NEXUS_BUCKET"]).get("Uploads")


# corruption -----------------------------------------------------------------------------


def _overwrite_s3(s3_client, bucket: str, key: str, data: bytes, store_checksum: bool) -> None:
    extra = {"ChecksumAlgorithm": "SHA256"} if store_checksum else {}
    s3_client.put_object(Bucket=bucket, Key=key, Body=data, **extra)


def _overwrite_gcs(bucket: str, key: str, data: bytes) -> None:
    from google.cloud import storage

    storage.Client().bucket(bucket).blob(key).upload_from_string(data)


@pytest.mark.parametrize(
    "where", ["s3-store-checksum", "s3-no-checksum", "gcs"], ids=lambda where: where
)
def test_a_corrupted_object_fails_load_and_verify(
    repo: Repo, cli, where: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    if where == "gcs":
        bucket = request.getfixturevalue("gcs_bucket")
        monkeypatch.setenv("NEXUS_PROVIDER", "gcs")
        monkeypatch.setenv("NEXUS_BUCKET", bucket)
    else:
        bucket = request.getfixturevalue("s3_env")["NEXUS_BUCKET"]
    original = os.urandom(200_000)
    stored = cli("store", repo.write_weights("m.pt", original), "victim", "--json")
    assert stored.exit_code == 0, stored.stderr
    tampered = bytearray(original)
    tampered[1000] ^= 0xFF
    if where == "gcs":
        _overwrite_gcs(bucket, stored.json["storage_uri"], bytes(tampered))
    else:
        client = request.getfixturevalue("s3_client")
        with_checksum = where == "s3-store-checksum"
        _overwrite_s3(client, bucket, stored.json["storage_uri"], bytes(tampered), with_checksum)

    downloads = repo.path / "downloads"
    downloads.mkdir()
    loaded = cli("load", "victim", "-o", downloads / "m.pt")
    assert loaded.exit_code == 7, loaded.stderr
    assert "sha256 mismatch" in loaded.stderr
    assert list(downloads.iterdir()) == []
    verified = cli("verify", "--json")
    assert verified.exit_code == 7
    assert verified.json["results"][0]["status"] == "mismatch"


# errors a user can act on ---------------------------------------------------------------


def test_s3_missing_bucket(repo: Repo, s3_env: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = repo.write_weights("m.pt", b"weights")
    assert run_nexus("store", weights, "m", cwd=repo.path).exit_code == 0
    monkeypatch.setenv("NEXUS_BUCKET", "no-such-bucket")
    for command in (["store", weights, "m2"], ["load", "m"], ["verify"]):
        result = run_nexus(*command, cwd=repo.path)
        assert_one_line_error(result, "'no-such-bucket' does not exist", "create it")


def test_s3_wrong_credentials(repo: Repo, s3_env: dict, moto_auth) -> None:
    moto_auth()
    result = run_nexus(
        "store", repo.write_weights("m.pt", b"w"), "m", cwd=repo.path,
        env={"AWS_ACCESS_KEY_ID": "AKIANOTAREALKEY", "AWS_SECRET_ACCESS_KEY": "wrong"},
    )  # fmt: skip
    assert_one_line_error(result, "rejected the AWS credentials (InvalidAccessKeyId)")
    assert s3_env["NEXUS_BUCKET"] in result.stderr


def test_s3_missing_credentials(repo: Repo, s3_env: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(repo.path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(repo.path / "no-aws-credentials"))
    result = run_nexus("store", repo.write_weights("m.pt", b"w"), "m", cwd=repo.path)
    assert_one_line_error(result, "no usable AWS credentials", "AWS_ACCESS_KEY_ID")


def test_s3_denied_request(repo: Repo, s3_env: dict, moto_auth) -> None:
    """Credentials that work but may only read: storing says what permission is missing."""
    import boto3

    iam = boto3.client("iam", endpoint_url=s3_env["NEXUS_ENDPOINT_URL"])
    iam.create_user(UserName="reader")
    read_only = {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}
    policy = {"Version": "2012-10-17", "Statement": [read_only]}
    iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    moto_auth()
    result = run_nexus(
        "store", repo.write_weights("m.pt", b"w"), "m", cwd=repo.path,
        env={"AWS_ACCESS_KEY_ID": key["AccessKeyId"],
             "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]},
    )  # fmt: skip
    assert_one_line_error(result, "access denied", "s3:PutObject")


def test_s3_unreachable_endpoint(repo: Repo, s3_env: dict, dead_endpoint: str) -> None:
    dead = dead_endpoint
    started = time.monotonic()
    result = run_nexus(
        "store", repo.write_weights("m.pt", b"w"), "m", cwd=repo.path,
        env={"NEXUS_ENDPOINT_URL": dead, "AWS_MAX_ATTEMPTS": "2"},
    )  # fmt: skip
    assert_one_line_error(result, f"cannot reach the endpoint {dead}", "NEXUS_ENDPOINT_URL")
    assert time.monotonic() - started < 30


def test_gcs_missing_bucket(repo: Repo, gcs_bucket: str, monkeypatch) -> None:
    monkeypatch.setenv("NEXUS_PROVIDER", "gcs")
    monkeypatch.setenv("NEXUS_BUCKET", "no-such-bucket")
    result = run_nexus("store", repo.write_weights("m.pt", b"w"), "m", cwd=repo.path)
    assert_one_line_error(result, "'no-such-bucket' does not exist", "STORAGE_EMULATOR_HOST")


def test_gcs_unreachable_endpoint_fails_fast(repo: Repo, monkeypatch, dead_endpoint) -> None:
    dead = dead_endpoint
    for name, value in {"NEXUS_PROVIDER": "gcs", "NEXUS_BUCKET": "some-bucket",
                        "STORAGE_EMULATOR_HOST": dead}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    started = time.monotonic()
    result = run_nexus("store", repo.write_weights("m.pt", b"w"), "m", cwd=repo.path)
    assert_one_line_error(result, f"cannot reach the GCS emulator at {dead}")
    assert time.monotonic() - started < 30


def test_gcs_missing_credentials(repo: Repo, monkeypatch, dead_endpoint: str) -> None:
    monkeypatch.setenv("NEXUS_PROVIDER", "gcs")
    monkeypatch.setenv("NEXUS_BUCKET", "some-bucket")
    # no emulator, no key file, and no probing for a GCE metadata server either
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    monkeypatch.setenv("GCE_METADATA_HOST", dead_endpoint.removeprefix("http://"))
    monkeypatch.setenv("GCE_METADATA_IP", dead_endpoint.removeprefix("http://"))
    result = run_nexus("store", repo.write_weights("m.pt", b"w"), "m", cwd=repo.path)
    assert_one_line_error(result, "no Google Cloud credentials", "GOOGLE_APPLICATION_CREDENTIALS")


def run_with_terminal_stderr(*args: str, cwd: Path, env: dict, timeout: float) -> Result:
    """Run `nexus` with stderr on a pseudo-terminal (as a person sees it), stdout a pipe."""
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "nexus_cli", *[str(a) for a in args]],
            cwd=cwd, env={**os.environ, **env},
            stdout=subprocess.PIPE, stderr=terminal, text=True,
        )  # fmt: skip
        os.close(terminal)
        terminal = -1
        out, _ = process.communicate(timeout=timeout)
        seen = b""
        with contextlib.suppress(OSError):  # EIO once the child's end is closed
            while chunk := os.read(controller, 65536):
                seen += chunk
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    return Result(process.returncode, out, seen.decode(errors="replace").replace("\r\n", "\n"))


@pytest.mark.slow  # ~30 s: two 15 s read timeouts, the real defaults
def test_s3_endpoint_that_never_answers_fails_within_a_minute(
    repo: Repo, s3_env: dict, silent_endpoint: str
) -> None:
    """It accepts connections and never replies: bounded timeouts and retries, a notice per
    retry on the terminal, and an error that says what happened (it took 362 s, silently,
    and then said "cannot reach")."""
    started = time.monotonic()
    result = run_with_terminal_stderr(
        "store", repo.write_weights("m.pt", b"w"), "m", "--json",
        cwd=repo.path, env={"NEXUS_ENDPOINT_URL": silent_endpoint}, timeout=90,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert result.exit_code == 6, (result.stdout, result.stderr)
    assert elapsed < 60
    error = json.loads(result.stdout)["error"]  # stdout holds the JSON and nothing else
    assert error["code"] == "storage_error"
    assert (
        f"the endpoint {silent_endpoint} accepted the connection but did not answer"
        in (error["message"])
    )
    assert "Traceback" not in result.stderr
    notices = [line for line in result.stderr.splitlines() if "retrying" in line]
    assert notices, result.stderr
    assert "did not answer" in notices[0]
    assert "(2 of 2)" in notices[0]
