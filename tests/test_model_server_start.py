"""Starting the model server: bad settings, failures that keep it up with the reason in
/readyz, readiness only after the load, the device queue off the event loop, and the
S3 path with a restart that downloads nothing."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from nexus_cli.api import Project
from tests.servers import (
    SIGNATURE_8_IN,
    clean_environ,
    free_port,
    make_model_repo,
    publish,
    publish_demo,
    reference_outputs,
    s3_storage,
)

pytest_plugins = ["tests.cloud_servers", "tests.servers"]


SLOW_FACTORY = """
import time
from model_server.demo import TinyClassifier

class Slow(TinyClassifier):
    def forward(self, x):
        time.sleep({seconds})
        return super().forward(x)

def build():
    return Slow()
"""


class Payload:
    """Unpickling this opens (creates) ``path``: proof that something ran the pickle."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


# settings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("NEXUS_SERVER_QUEUE", "many"),
        ("NEXUS_SERVER_MAX_BATCH", "0"),
        ("NEXUS_SERVER_CONCURRENCY", "-1"),
        ("NEXUS_MAX_BODY_BYTES", "12kb"),
        ("NEXUS_BODY_TIMEOUT_S", "nan"),
        ("NEXUS_API_TOKEN", " padded-token"),
        ("NEXUS_PORT", "70000"),
        ("NEXUS_DEVICE", "gpu"),
        ("NEXUS_MODEL", "no spaces please"),
        ("NEXUS_MODEL_FACTORY", "not-a-callable"),
        ("NEXUS_PROVIDER", "ftp"),
        ("NEXUS_CONFIG", "missing.toml"),
    ],
)
def test_bad_setting_exits_2_naming_it(tmp_path: Path, variable: str, value: str) -> None:
    env = {**clean_environ(), variable: value}
    done = subprocess.run(
        [sys.executable, "-m", "model_server"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("nexus-model-server: ")
    named = variable if variable != "NEXUS_PROVIDER" else "ftp"
    assert named in lines[0]
    assert "Traceback" not in done.stderr


def test_a_sighup_during_the_start_does_not_end_the_process(tmp_path: Path) -> None:
    """SIGHUP reloads once the app runs; sent while the server still imports (a config
    reloader firing early) its default action ended the process with status 129."""
    repo = make_model_repo(tmp_path / "project")
    publish_demo(repo, seed=1)
    port = free_port()
    log = tmp_path / "server.log"
    env = {**clean_environ(), "NEXUS_PORT": str(port), "NEXUS_CACHE_DIR": str(tmp_path / "c")}
    with open(log, "wb") as sink:
        process = subprocess.Popen([sys.executable, "-m", "model_server"], cwd=repo, env=env,
                                   stdout=sink, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "starting on" not in log.read_text():  # settings read; uvicorn not yet imported
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.01)
        process.send_signal(signal.SIGHUP)
        while True:
            assert process.poll() is None, f"ended by SIGHUP:\n{log.read_text()}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        process.terminate()
        process.wait(30)


# failures that keep the process up ------------------------------------------------------


def start_failing(model_server_process, repo: Path, **env: str) -> dict:
    server = model_server_process({"NEXUS_CACHE_DIR": str(repo.parent / "cache"), **env}, repo)
    document = server.wait_failed()
    assert server.process.poll() is None  # alive, saying why
    assert server.readiness()[0] == 503
    assert httpx.get(f"{server.url}/health", trust_env=False).status_code == 200
    predict = httpx.post(f"{server.url}/predict/batch", json={"inputs": [[0.0] * 8]},
                         trust_env=False)  # fmt: skip
    assert predict.status_code == 503
    assert predict.json()["error"]["code"] == "unavailable"
    reason = document["checks"]["model"]
    assert reason in server.log_text() or reason.split(": ", 1)[-1] in server.log_text()
    return document


def test_empty_registry_names_the_publishing_command(model_server_process, tmp_path: Path) -> None:
    """The compose stack's registry is tracked empty: not ready until a model is published;
    readiness comes only once that model is loaded."""
    repo = make_model_repo(tmp_path / "project")
    server = model_server_process({"NEXUS_CACHE_DIR": str(tmp_path / "cache")}, repo)
    document = server.wait_failed()
    assert "make publish-demo" in document["checks"]["model"]
    assert document["checks"]["metadata"].startswith("failed")

    version = publish_demo(repo, seed=1)
    assert server.readiness()[0] == 503  # nothing happens until told
    response = httpx.post(f"{server.url}/admin/reload", trust_env=False, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["from_commit"] is None
    assert response.json()["to_commit"] == version.commit
    assert server.readiness()[0] == 200


def test_no_metadata_file(model_server_process, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    document = start_failing(model_server_process, tmp_path / "empty")
    assert "no metadata at" in document["checks"]["model"]


def test_bad_checksum(model_server_process, tmp_path: Path) -> None:
    repo = make_model_repo(tmp_path / "project")
    version = publish_demo(repo, seed=1)
    stored = repo / ".nexus" / "store" / version.record.storage_uri
    data = bytearray(stored.read_bytes())
    data[100] ^= 0x01
    stored.write_bytes(bytes(data))
    document = start_failing(model_server_process, repo)
    assert document["checks"]["weights"].startswith("failed")
    assert "sha256 mismatch" in document["checks"]["model"]
    assert not list((tmp_path / "cache").glob(f"{version.record.sha256}*"))  # nothing kept


def test_missing_object(model_server_process, tmp_path: Path) -> None:
    repo = make_model_repo(tmp_path / "project")
    version = publish_demo(repo, seed=1)
    (repo / ".nexus" / "store" / version.record.storage_uri).unlink()
    document = start_failing(model_server_process, repo)
    assert "missing" in document["checks"]["model"]


def test_unreachable_store(model_server_process, tmp_path: Path, aws_env: dict) -> None:
    repo = make_model_repo(tmp_path / "project")
    publish_demo(repo, seed=1)  # recorded in the metadata; the server looks in S3 for it
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    document = start_failing(
        model_server_process, repo, **aws_env, NEXUS_PROVIDER="s3", NEXUS_BUCKET="gone",
        NEXUS_ENDPOINT_URL=closed,
    )  # fmt: skip
    assert document["checks"]["weights"].startswith("failed")
    assert "127.0.0.1" in document["checks"]["model"]


def test_pickled_module_is_never_loaded(model_server_process, tmp_path: Path) -> None:
    repo = make_model_repo(tmp_path / "project")
    marker = tmp_path / "unpickled"
    weights = repo / "out" / "module.pt"
    weights.parent.mkdir(exist_ok=True)
    # a whole module, and a payload that would leave a file behind if anything unpickled it
    torch.save({"module": torch.nn.Linear(8, 2), "payload": Payload(marker)}, weights)
    publish(repo, weights)
    document = start_failing(model_server_process, repo)
    reason = document["checks"]["model"]
    assert "not a format the server loads safely" in reason
    for safe in ("TorchScript", "torch.export", "state_dict", "safetensors"):
        assert safe in reason
    assert not marker.exists()


def test_state_dict_needs_a_factory(model_server_process, tmp_path: Path) -> None:
    repo = make_model_repo(tmp_path / "project")
    publish_demo(repo, seed=1, fmt="state_dict")
    document = start_failing(model_server_process, repo)
    assert "NEXUS_MODEL_FACTORY" in document["checks"]["model"]


def test_factory_that_does_not_fit_the_weights(model_server_process, tmp_path: Path) -> None:
    repo = make_model_repo(tmp_path / "project")
    publish_demo(repo, seed=1, fmt="safetensors")
    document = start_failing(
        model_server_process, repo, NEXUS_MODEL_FACTORY="model_server.demo:build_small_mlp"
    )
    assert "do not fit NEXUS_MODEL_FACTORY" in document["checks"]["model"]


def test_cuda_asked_for_where_there_is_none(model_server_process, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the device is there")
    repo = make_model_repo(tmp_path / "project")
    publish_demo(repo, seed=1)
    document = start_failing(model_server_process, repo, NEXUS_DEVICE="cuda:0")
    assert "CUDA is not available" in document["checks"]["model"]


# readiness, the device queue and /health under a slow batch --------------------------------


def test_slow_model_never_blocks_health(model_server_process, tmp_path: Path) -> None:
    """A factory model that sleeps in forward: not ready while its warm-up runs, /health
    answers while a batch runs, and a full device queue answers 503 with Retry-After."""
    repo = make_model_repo(tmp_path / "project")
    publish_demo(repo, seed=1, fmt="state_dict", signature=SIGNATURE_8_IN)
    (repo / "slow_factory.py").write_text(SLOW_FACTORY.format(seconds=1.5))  # in the cwd
    server = model_server_process(
        {
            "NEXUS_CACHE_DIR": str(tmp_path / "cache"),
            "NEXUS_MODEL_FACTORY": "slow_factory:build",
            "NEXUS_SERVER_QUEUE": "1",
        },
        repo,
    )
    status, document = server.readiness()  # the warm-up forward sleeps: not ready yet
    assert status == 503, document
    assert document["status"] == "loading"
    server.wait_ready()

    url = f"{server.url}/predict/batch"
    answers: list[httpx.Response] = []

    def send() -> None:
        answers.append(httpx.post(url, json={"inputs": [[0.1] * 8]}, timeout=60, trust_env=False))

    running = threading.Thread(target=send)
    running.start()
    time.sleep(0.3)
    queued = threading.Thread(target=send)  # waits for the device: the queue is now full
    queued.start()
    time.sleep(0.3)
    full = httpx.post(url, json={"inputs": [[0.1] * 8]}, timeout=60, trust_env=False)
    health_times = []
    for _ in range(5):
        started = time.monotonic()
        assert httpx.get(f"{server.url}/health", timeout=30, trust_env=False).status_code == 200
        health_times.append(time.monotonic() - started)
    assert running.is_alive()  # /health answered while the batch was on the device
    running.join(60)
    queued.join(60)

    assert full.status_code == 503, full.text
    assert full.json()["error"]["code"] == "queue_full"
    assert int(full.headers["retry-after"]) >= 1
    assert max(health_times) < 1.0, health_times  # a hang would take the batch's 1.5 s+
    assert [a.status_code for a in answers] == [200, 200]


# S3 (moto) ------------------------------------------------------------------------------


def test_s3_start_and_restart_with_a_warm_cache(
    model_server_process,
    tmp_path: Path,
    s3_bucket: str,
    s3_client,
    moto_endpoint: str,
    aws_env: dict,
) -> None:
    storage = s3_storage(s3_bucket, moto_endpoint)
    repo = make_model_repo(tmp_path / "project")
    version = publish_demo(repo, seed=1, environ={**aws_env, **storage})
    assert s3_client.head_object(Bucket=s3_bucket, Key=version.record.storage_uri)
    env = {**aws_env, **storage, "NEXUS_CACHE_DIR": str(tmp_path / "cache")}
    inputs = [[0.25] * 8] * 3
    expected = reference_outputs(version.weights, "torchscript", inputs)

    first = model_server_process(env, repo)
    assert first.wait_ready()["checks"]["weights"].startswith("ok in")
    assert "downloaded" in first.readiness()[1]["checks"]["weights"]
    first.stop()

    # the object is gone from the store: a restart can only be served by the cache
    s3_client.delete_object(Bucket=s3_bucket, Key=version.record.storage_uri)
    second = model_server_process(env, repo)
    assert "cache hit" in second.wait_ready()["checks"]["weights"]
    answer = httpx.post(f"{second.url}/predict/batch", json={"inputs": inputs}, trust_env=False)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"]["commit_hash"] == version.commit
    assert [[round(v, 5) for v in row] for row in answer.json()["outputs"]] == [
        [round(float(v), 5) for v in row] for row in expected
    ]
    second.stop()

    # and with a cold cache the missing object is a failed start that says so
    cold = {**env, "NEXUS_CACHE_DIR": str(tmp_path / "cold-cache")}
    third = model_server_process(cold, repo)
    document = third.wait_failed()
    assert "missing" in document["checks"]["model"], document
    assert Project(repo / ".nexus_meta.json").resolve("demo").commit_hash == version.commit
