"""`nexus gc`: what killed uploads leave behind goes; stored versions never do."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from nexus_cli.files import temp_path_beside
from tests.conftest import Repo, run_nexus

pytest_plugins = ["tests.cloud_servers"]

DAY = 24 * 3600


def leftover_beside(target: Path, *, age_s: float, size: int = 1000) -> Path:
    """A temp file as a killed `nexus store` leaves it, last written ``age_s`` ago."""
    temp = temp_path_beside(target)
    temp.parent.mkdir(parents=True, exist_ok=True)
    temp.write_bytes(b"\0" * size)
    when = time.time() - age_s
    os.utime(temp, (when, when))
    return temp


def test_gc_on_the_local_store(cli, repo: Repo) -> None:
    stored = cli("store", repo.write_weights("m.pt", b"weights"), "prod_model", "--json").json
    store = repo.path / ".nexus" / "store"
    kept_object = store / stored["storage_uri"]
    old = leftover_beside(kept_object, age_s=2 * DAY, size=1234)
    fresh = leftover_beside(kept_object, age_s=60)

    dry = cli("gc", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.stderr
    assert dry.json["dry_run"] is True
    assert [(x["kind"], x["name"], x["size"]) for x in dry.json["leftovers"]] == [
        ("incomplete_file", old.relative_to(store).as_posix(), 1234)
    ]
    assert old.exists()

    human = cli("gc", "--dry-run")
    assert "Would remove" in human.stdout
    assert old.name in human.stdout

    removed = cli("gc", "--json")
    assert removed.json["count"] == 1
    assert removed.json["bytes"] == 1234
    assert not old.exists()
    assert fresh.exists()  # younger than the default day: maybe still being written
    assert kept_object.read_bytes() == b"weights"

    assert cli("gc", "--older-than", "30m", "--json").json["count"] == 0
    assert cli("gc", "--older-than", "30s", "--json").json["count"] == 1
    assert not fresh.exists()
    assert kept_object.read_bytes() == b"weights"
    assert cli("verify").exit_code == 0


@pytest.mark.parametrize("bad", ["1", "d", "1y", "-1d", "1.5h", ""])
def test_gc_refuses_a_bad_duration(cli, repo: Repo, bad: str) -> None:
    result = cli("gc", "--older-than", bad, "--json")
    assert result.exit_code == 2
    assert "--older-than" in result.json["error"]["message"]


@pytest.mark.parametrize("too_long", ["999999d", "999999w"])
def test_gc_refuses_an_age_past_any_date(cli, repo: Repo, too_long: str) -> None:
    """The cutoff would fall before year 1 (it was exit 1, OverflowError)."""
    leftover_beside(repo.path / ".nexus" / "store" / "m" / "k.pt", age_s=2 * DAY)
    result = cli("gc", "--older-than", too_long, "--json")
    assert result.exit_code == 2
    assert "100 years" in result.json["error"]["message"]


def test_gc_on_s3_aborts_only_old_multipart_uploads(
    repo: Repo, s3_client: Any, s3_bucket: str, moto_endpoint: str
) -> None:
    env = {"NEXUS_PROVIDER": "s3", "NEXUS_BUCKET": s3_bucket, "NEXUS_ENDPOINT_URL": moto_endpoint}
    stored = run_nexus("store", repo.write_weights("m.pt", b"weights"), "prod_model", "--json",
                       cwd=repo.path, env=env)  # fmt: skip
    assert stored.exit_code == 0, stored.stderr
    key = json.loads(stored.stdout)["storage_uri"]
    killed = f"prod_model/{'e' * 40}.pt"  # a `nexus store` killed mid-upload
    upload = s3_client.create_multipart_upload(Bucket=s3_bucket, Key=killed)
    s3_client.upload_part(Bucket=s3_bucket, Key=killed, PartNumber=1,
                          UploadId=upload["UploadId"], Body=b"x" * 100)  # fmt: skip

    young = run_nexus("gc", "--json", cwd=repo.path, env=env)
    assert young.exit_code == 0, young.stderr
    assert json.loads(young.stdout)["count"] == 0  # started just now: spared by the default day

    time.sleep(1.1)
    dry = json.loads(run_nexus("gc", "--older-than", "1s", "--dry-run", "--json",
                               cwd=repo.path, env=env).stdout)  # fmt: skip
    assert [(x["kind"], x["name"], x["upload_id"]) for x in dry["leftovers"]] == [
        ("multipart_upload", killed, upload["UploadId"])
    ]
    assert len(s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])) == 1
    human = run_nexus("gc", "--older-than", "1s", "--dry-run", cwd=repo.path, env=env)
    assert human.exit_code == 0, human.stderr
    assert killed in human.stdout
    assert "100 B" in human.stdout

    done = run_nexus("gc", "--older-than", "1s", "--json", cwd=repo.path, env=env)
    assert json.loads(done.stdout)["count"] == 1
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert s3_client.get_object(Bucket=s3_bucket, Key=key)["Body"].read() == b"weights"


def test_gc_on_s3_leaves_other_applications_uploads_alone(
    repo: Repo, s3_client: Any, s3_bucket: str, moto_endpoint: str
) -> None:
    """A bucket (with no prefix) may be shared: only uploads to keys nexus writes are its own."""
    env = {"NEXUS_PROVIDER": "s3", "NEXUS_BUCKET": s3_bucket, "NEXUS_ENDPOINT_URL": moto_endpoint}
    foreign = ["backups/db.tar", "prod_model/notes.txt", f"a/b/{'e' * 40}.pt"]
    for key in foreign:
        s3_client.create_multipart_upload(Bucket=s3_bucket, Key=key)
    ours = f"prod_model/{'d' * 40}.pt"
    s3_client.create_multipart_upload(Bucket=s3_bucket, Key=ours)
    time.sleep(1.1)

    done = run_nexus("gc", "--older-than", "1s", "--json", cwd=repo.path, env=env)
    assert done.exit_code == 0, done.stderr
    assert [x["name"] for x in json.loads(done.stdout)["leftovers"]] == [ours]
    left = s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
    assert sorted(upload["Key"] for upload in left) == sorted(foreign)
