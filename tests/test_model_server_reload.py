"""Hot reload on a live server: a swap under load with no failed request, failures that
keep the old model serving, two reloads at once, SIGHUP. One server for the module; each
test publishes what it needs on top of what the previous one left."""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from nexus_cli.api import Project
from tests.servers import (
    ModelServerProcess,
    Published,
    make_model_repo,
    publish,
    publish_demo,
    reference_outputs,
)

INPUTS = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32).tolist()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_repo(tmp_path_factory.mktemp("reload") / "project")


@pytest.fixture(scope="module")
def first(repo: Path) -> Published:
    return publish_demo(repo, seed=1)


@pytest.fixture(scope="module")
def server(
    repo: Path, first: Published, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ModelServerProcess]:
    env = {"NEXUS_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}
    with ModelServerProcess(env, repo, log=tmp_path_factory.mktemp("log") / "server.log") as proc:
        proc.wait_ready()
        yield proc


@pytest.fixture(scope="module")
def client(server: ModelServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60, trust_env=False) as http:
        yield http


def serving_commit(client: httpx.Client) -> str:
    return client.get("/v1/metadata").json()["model"]["commit_hash"]


def assert_serving(client: httpx.Client, version: Published) -> None:
    response = client.post("/predict/batch", json={"inputs": INPUTS})
    assert response.status_code == 200, response.text
    assert response.json()["model"]["commit_hash"] == version.commit
    expected = reference_outputs(version.weights, version.fmt, INPUTS)
    np.testing.assert_allclose(response.json()["outputs"], expected, rtol=1e-6)


def test_reload_with_nothing_new(client: httpx.Client, first: Published) -> None:
    response = client.post("/admin/reload")
    assert response.status_code == 200, response.text
    assert response.json() == {
        "from_commit": first.commit,
        "to_commit": first.commit,
        "model": "demo",
        "changed": False,
    }


def test_reload_under_load_fails_no_request(
    client: httpx.Client, server: ModelServerProcess, repo: Path, first: Published
) -> None:
    second = publish_demo(repo, seed=2)
    expected = {v.commit: reference_outputs(v.weights, v.fmt, INPUTS) for v in (first, second)}
    reloaded_at: list[float] = []
    stop = threading.Event()

    def hammer() -> list[tuple[float, int, str, list]]:
        seen = []
        with httpx.Client(base_url=server.url, timeout=60, trust_env=False) as http:
            for _ in range(2000):  # bounded; stops well before, once told
                sent = time.monotonic()
                response = http.post("/predict/batch", json={"inputs": INPUTS})
                body = response.json()
                commit = body.get("model", {}).get("commit_hash", "")
                seen.append((sent, response.status_code, commit, body.get("outputs")))
                if stop.is_set():
                    break
        return seen

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(hammer) for _ in range(8)]
        time.sleep(0.5)
        response = client.post("/admin/reload")
        reloaded_at.append(time.monotonic())
        time.sleep(0.5)
        stop.set()
        results = [r for future in futures for r in future.result(timeout=120)]

    assert response.status_code == 200, response.text
    assert response.json() == {
        "from_commit": first.commit,
        "to_commit": second.commit,
        "model": "demo",
        "changed": True,
    }
    assert all(status == 200 for _, status, _, _ in results), {s for _, s, _, _ in results}
    after = [r for r in results if r[0] > reloaded_at[0]]
    assert after, "no request was sent after the reload returned"
    assert {commit for _, _, commit, _ in after} == {second.commit}
    # the old model answered until the swap, the new one after it
    assert {commit for _, _, commit, _ in results} == {first.commit, second.commit}
    for _, _, commit, outputs in results:  # each answer is its own model's, never mixed
        np.testing.assert_allclose(outputs, expected[commit], rtol=1e-6)


def test_reload_to_a_corrupt_object_keeps_the_old_model(client: httpx.Client, repo: Path) -> None:
    serving = serving_commit(client)
    current = next(v for v in Project(repo / ".nexus_meta.json").list_versions("demo")
                   if v.commit_hash == serving)  # fmt: skip
    broken = publish_demo(repo, seed=3)
    stored = repo / ".nexus" / "store" / broken.record.storage_uri
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    stored.write_bytes(bytes(data))

    response = client.post("/admin/reload")
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["code"] == "reload_failed"
    assert "sha256 mismatch" in error["message"]
    assert f"still serving demo@{serving[:7]}" in error["message"]

    readiness = client.get("/readyz")
    assert readiness.status_code == 200
    assert "failed" in readiness.json()["checks"]["last_reload"]
    assert serving_commit(client) == current.commit_hash
    Project(repo / ".nexus_meta.json").rollback("demo", to=current.commit_hash)
    assert client.post("/admin/reload").json()["changed"] is False


def test_reload_to_a_pickled_module_is_refused(client: httpx.Client, repo: Path) -> None:
    serving = serving_commit(client)
    weights = repo / "out" / "whole-module.pt"
    torch.save(torch.nn.Linear(8, 2), weights)  # a whole pickled module: never loaded
    publish(repo, weights)

    response = client.post("/admin/reload")
    assert response.status_code == 409, response.text
    message = response.json()["error"]["message"]
    assert "not a format the server loads safely" in message
    assert "TorchScript" in message
    assert "safetensors" in message
    assert serving_commit(client) == serving
    Project(repo / ".nexus_meta.json").rollback("demo", to=serving)


def test_two_reloads_at_once_load_once(
    client: httpx.Client, server: ModelServerProcess, repo: Path
) -> None:
    fourth = publish_demo(repo, seed=4)
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: client.post("/admin/reload"), range(2)))
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    documents = sorted((a.json() for a in answers), key=lambda d: d["changed"])
    assert [d["changed"] for d in documents] == [False, True]
    assert {d["to_commit"] for d in documents} == {fourth.commit}
    short = fourth.commit[:7]
    loads = re.findall(rf"load ok .*demo@{short}", server.log_text())
    assert len(loads) == 1, server.log_text()[-3000:]
    assert_serving(client, fourth)


def test_sighup_reloads(client: httpx.Client, server: ModelServerProcess, repo: Path) -> None:
    fifth = publish_demo(repo, seed=5)
    server.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 60
    while serving_commit(client) != fifth.commit:
        assert time.monotonic() < deadline, server.log_text()[-3000:]
        time.sleep(0.05)
    assert_serving(client, fifth)
