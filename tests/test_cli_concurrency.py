"""Several `nexus store` processes at once, and one killed halfway, on the local store."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Repo, run_nexus


def start_store(repo: Repo, weights: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "nexus_cli", "store", str(weights), "prod_model", "--json"],
        cwd=repo.path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(processes: list[subprocess.Popen]) -> list[tuple[int, str]]:
    outputs = [p.communicate(timeout=120)[0] for p in processes]
    return [(p.returncode, out) for p, out in zip(processes, outputs, strict=True)]


def test_two_writers_of_different_bytes_one_wins(repo: Repo) -> None:
    payloads = [os.urandom(4_000_000), os.urandom(4_000_000)]
    files = [repo.write_weights(f"m{i}.pt", data) for i, data in enumerate(payloads)]
    outcomes = finish([start_store(repo, f) for f in files])
    codes = sorted(code for code, _ in outcomes)
    assert codes == [0, 5], outcomes
    winner = next(i for i, (code, _) in enumerate(outcomes) if code == 0)
    record = json.loads(outcomes[winner][1])
    stored = repo.path / ".nexus" / "store" / record["storage_uri"]
    assert stored.read_bytes() == payloads[winner]
    versions = repo.meta["models"]["prod_model"]["versions"]
    assert [v["sha256"] for v in versions] == [hashlib.sha256(payloads[winner]).hexdigest()]
    loser_error = json.loads(outcomes[1 - winner][1])["error"]
    assert loser_error["code"] == "conflict"


def test_two_writers_of_the_same_bytes_both_succeed_with_one_upload(repo: Repo) -> None:
    data = os.urandom(4_000_000)
    files = [repo.write_weights(f"same{i}.pt", data) for i in range(2)]
    outcomes = finish([start_store(repo, f) for f in files])
    assert [code for code, _ in outcomes] == [0, 0], outcomes
    uploaded = sorted(json.loads(out)["uploaded"] for _, out in outcomes)
    assert uploaded == [False, True]
    assert len(repo.meta["models"]["prod_model"]["versions"]) == 1


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_a_store_killed_mid_write_leaves_nothing_and_runs_again(repo: Repo) -> None:
    weights = repo.write_weights("big.pt", b"")
    with open(weights, "r+b") as handle:  # 512 MiB, mostly a hole: quick to make, slow to copy
        handle.truncate(512 * 1024 * 1024)
        handle.write(b"header")
    process = start_store(repo, weights)
    model_dir = repo.path / ".nexus" / "store" / "prod_model"
    deadline = time.monotonic() + 60
    while not list(model_dir.glob(".*.incomplete")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the upload never started"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert [p.name for p in model_dir.iterdir() if not p.name.startswith(".")] == []
    assert not (repo.path / ".nexus_meta.json").exists()

    again = run_nexus("store", weights, "prod_model", "--json", cwd=repo.path)
    assert again.exit_code == 0, again.stderr
    record = json.loads(again.stdout)
    assert record["uploaded"] is True
    assert record["size_bytes"] == 512 * 1024 * 1024
    verified = run_nexus("verify", "--json", cwd=repo.path)
    assert json.loads(verified.stdout)["counts"]["ok"] == 1
