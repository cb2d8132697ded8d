"""The model server's memory on a live process: requests reuse the heap, a reload leaves
no second copy of the weights behind.

The model has many 4 MiB tensors (1024 x 1024 layers): big enough that a copy left
behind shows in the RSS, small enough that malloc may keep them in its heap.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from model_server.demo import MLP, save
from model_server.memory import one_malloc_arena
from tests.servers import ModelServerProcess, make_model_repo, publish, s3_storage

FEATURES = 1024
FACTORY = """
from model_server.demo import MLP


def build():
    return MLP(1024, 1024, 15, 16)
"""
SIGNATURE = {
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, FEATURES]}],
    "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 16]}],
}
BODY = {"inputs": np.random.default_rng(0).normal(size=(32, FEATURES)).round(4).tolist()}


def weights_mb() -> float:
    model = MLP(FEATURES, 1024, 15, 16)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20


def make_wide_repo(path: Path) -> Path:
    """A model repository whose factory (``wide:build``) is committed in it."""
    make_model_repo(path)
    (path / "wide.py").write_text(FACTORY)
    subprocess.run(["git", "add", "wide.py"], cwd=path, check=True)
    subprocess.run(["git", "commit", "-qm", "the factory"], cwd=path, check=True)
    return path


def publish_wide(
    repo: Path, seed: int, signature: dict = SIGNATURE, environ: dict | None = None
) -> None:
    torch.manual_seed(seed)
    weights = save(MLP(FEATURES, 1024, 15, 16), repo / "out" / f"wide-{seed}.pt", "state_dict")
    publish(repo, weights, model="wide", signature=signature, environ=environ)


def wait_for_rss_near(pid: int, before: int, seconds: float = 10) -> float:
    """MB the RSS is above ``before`` once it is within half the weights' size of it, or
    when ``seconds`` have passed (the trim runs on a thread of its own)."""
    deadline = time.monotonic() + seconds
    while True:
        grown_mb = (proc_status(pid, "VmRSS") - before) / 2**20
        if grown_mb < weights_mb() / 2 or time.monotonic() > deadline:
            return grown_mb
        time.sleep(0.1)


def proc_status(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) * 1024


def minor_faults(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[7])  # minflt, the 10th field of /proc/PID/stat


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = make_wide_repo(tmp_path_factory.mktemp("memory") / "project")
    publish_wide(path, seed=1)
    return path


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServerProcess]:
    env = {
        "NEXUS_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
        "NEXUS_MODEL_FACTORY": "wide:build",
    }
    with ModelServerProcess(env, repo) as proc:
        proc.wait_ready()
        yield proc


pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
pytest_plugins = ["tests.cloud_servers"]


def test_requests_reuse_memory_instead_of_faulting_it_in(server: ModelServerProcess) -> None:
    with httpx.Client(base_url=server.url, timeout=60, trust_env=False) as client:
        for _ in range(5):  # warm-up: the heap grows to what a request needs
            assert client.post("/predict/batch", json=BODY).status_code == 200
        before = minor_faults(server.process.pid)
        for _ in range(20):
            assert client.post("/predict/batch", json=BODY).status_code == 200
        per_request = (minor_faults(server.process.pid) - before) / 20
    # with a fixed 1 MiB mmap threshold the parser's buffer alone faulted ~200 pages in
    # again on every request
    assert per_request < 50, per_request


def test_a_reload_leaves_no_second_copy_behind(server: ModelServerProcess, repo: Path) -> None:
    pid = server.process.pid
    with httpx.Client(base_url=server.url, timeout=120, trust_env=False) as client:
        assert client.post("/predict/batch", json=BODY).status_code == 200
        before = proc_status(pid, "VmRSS")
        publish_wide(repo, seed=2)
        answer = client.post("/admin/reload")
        assert answer.status_code == 200, answer.text
        assert answer.json()["changed"], answer.text
    # no request after the swap: nothing but the server itself may free the old weights
    grown_mb = wait_for_rss_near(pid, before)
    assert grown_mb < weights_mb() / 2, f"RSS grew {grown_mb:.0f} MB over a reload"


def test_reloads_under_load_leave_no_copies_behind(server: ModelServerProcess, repo: Path) -> None:
    """Requests in flight hold the old weights past the swap; they are given back once
    the last of those requests ends, reload after reload."""
    pid = server.process.pid
    stop = threading.Event()

    def hammer() -> list[int]:
        with httpx.Client(base_url=server.url, timeout=60, trust_env=False) as client:
            statuses = []
            deadline = time.monotonic() + 60  # bounded whatever happens
            while not stop.is_set() and time.monotonic() < deadline:
                statuses.append(client.post("/predict/batch", json=BODY).status_code)
            return statuses

    with httpx.Client(base_url=server.url, timeout=120, trust_env=False) as client:
        before = proc_status(pid, "VmRSS")
        with ThreadPoolExecutor(4) as pool:
            clients = [pool.submit(hammer) for _ in range(4)]
            for seed in (10, 11, 12):
                publish_wide(repo, seed=seed)
                answer = client.post("/admin/reload")
                assert answer.status_code == 200, answer.text
            stop.set()
            statuses = [status for done in clients for status in done.result()]
    assert statuses, "no request was sent"
    assert set(statuses) == {200}, sorted(set(statuses))
    grown_mb = wait_for_rss_near(pid, before)
    assert grown_mb < weights_mb() / 2, f"RSS grew {grown_mb:.0f} MB over 3 reloads under load"


def test_a_failed_reload_leaves_nothing_behind(server: ModelServerProcess, repo: Path) -> None:
    """The new weights load, then the warm-up fails (the signature says 512 features):
    what the failed load held goes back, and the old model keeps serving."""
    pid = server.process.pid
    wrong = {**SIGNATURE, "inputs": [{**SIGNATURE["inputs"][0], "shape": [-1, 512]}]}
    with httpx.Client(base_url=server.url, timeout=120, trust_env=False) as client:
        serving = client.get("/v1/metadata").json()["model"]["commit_hash"]
        before = proc_status(pid, "VmRSS")
        publish_wide(repo, seed=3, signature=wrong)
        answer = client.post("/admin/reload")
        assert answer.status_code == 409, answer.text
        assert "warmup failed" in answer.json()["error"]["message"], answer.text
        assert client.get("/v1/metadata").json()["model"]["commit_hash"] == serving
        grown_mb = wait_for_rss_near(pid, before)
        assert client.post("/predict/batch", json=BODY).status_code == 200
    assert grown_mb < weights_mb() / 2, f"RSS grew {grown_mb:.0f} MB over a failed reload"


def test_a_download_leaves_no_transfer_buffers_behind(
    tmp_path: Path, s3_bucket: str, moto_endpoint: str, aws_env: dict
) -> None:
    """A start that downloads 64 MB from S3 in parallel 8 MiB parts ends with the RSS of a
    start from a warm cache: each download thread's last part used to stay in its own
    malloc arena, where a trim does not reach."""
    storage = s3_storage(s3_bucket, moto_endpoint)
    repo = make_wide_repo(tmp_path / "project")
    publish_wide(repo, seed=1, environ={**aws_env, **storage})
    env = {
        **aws_env,
        **storage,
        "NEXUS_CACHE_DIR": str(tmp_path / "cache"),
        "NEXUS_MODEL_FACTORY": "wide:build",
    }
    rss = {}
    for start in ("downloaded", "cache hit"):
        with ModelServerProcess(env, repo, log=tmp_path / f"{start}.log") as server:
            assert start in server.wait_ready()["checks"]["weights"]
            rss[start] = proc_status(server.process.pid, "VmRSS") / 2**20
    assert rss["downloaded"] - rss["cache hit"] < weights_mb() / 2, rss


@pytest.mark.parametrize(
    "environ", [{"MALLOC_ARENA_MAX": "4"}, {"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}]
)
def test_an_arena_count_the_operator_chose_is_kept(environ: dict) -> None:
    assert one_malloc_arena(environ) is False
