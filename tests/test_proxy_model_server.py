"""The proxy in front of the real model server (tests/servers.py), on 127.0.0.1.

Every answer is compared with the same weights run directly in torch. One model server
(the TorchScript demo classifier) and one proxy serve the module; the kill-and-restart
test starts its own pair.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import aiohttp
import numpy as np
import pytest

from tests.fake_backend import http, metric, start_proxy, tritonclient_call, wait_until
from tests.servers import ModelServerProcess, make_model_repo, publish_demo, reference_outputs

JSON_HEADERS = {"Content-Type": "application/json"}
pytestmark = pytest.mark.timeout(180)

TOKEN = "proxy-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    repo = make_model_repo(tmp_path_factory.mktemp("served") / "project")
    return repo, publish_demo(repo, seed=7)


@pytest.fixture(scope="module")
def server(published, tmp_path_factory):
    repo, _ = published
    env = {"NEXUS_CACHE_DIR": str(tmp_path_factory.mktemp("cache")), "NEXUS_API_TOKEN": TOKEN}
    with ModelServerProcess(env, repo, log=tmp_path_factory.mktemp("log") / "server.log") as proc:
        proc.wait_ready()
        yield proc


@pytest.fixture(scope="module")
def proxy(server, tmp_path_factory):
    process = start_proxy(
        tmp_path_factory.mktemp("proxy"),
        {"NEXUS_MODEL_SERVER_URL": server.url, "NEXUS_API_TOKEN": TOKEN},
    )
    wait_until(lambda: http("GET", process.url + "/readyz")[0] == 200, 60, "proxy ready")
    yield process
    process.kill()


async def predict_all(url: str, samples, connections: int = 500):
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=90)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(sample):
            async with session.post(
                url + "/predict",
                data=json.dumps({"input": sample}).encode(),
                headers={**JSON_HEADERS, **AUTH},
            ) as response:
                return response.status, await response.json(content_type=None)

        return await asyncio.gather(*(one(s) for s in samples))


def test_500_concurrent_predictions_equal_torch(proxy, published) -> None:
    _, version = published
    inputs = np.random.default_rng(11).normal(size=(500, 8)).astype(np.float32)
    expected = reference_outputs(version.weights, version.fmt, inputs)
    before = http("GET", proxy.url + "/metrics")[2].decode()
    answers = asyncio.run(predict_all(proxy.url, inputs.tolist()))
    after = http("GET", proxy.url + "/metrics")[2].decode()
    for index, (status, body) in enumerate(answers):
        assert status == 200, body
        np.testing.assert_allclose(body["output"], expected[index], rtol=1e-5, atol=1e-6)
        assert body["model"] == {"name": "demo", "commit_hash": version.commit}

    def grew(name: str) -> float:
        return metric(after, name) - metric(before, name)

    batches = grew("nexus_proxy_batch_size_count")
    sent = grew("nexus_proxy_batch_size_sum")
    assert sent == 500
    assert batches < 500  # some batches held more than one request


def test_v2_with_tritonclient_equals_torch(proxy, published) -> None:
    _, version = published
    rows = np.random.default_rng(5).normal(size=(6, 8)).astype(np.float32)
    seen = tritonclient_call(
        proxy.url, "demo", rows.tolist(), input_name="input", output_name="output",
        version=version.commit, headers=AUTH,
    )  # fmt: skip
    assert seen["metadata"]["versions"] == [version.commit]
    assert seen["metadata"]["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 8]}]
    expected = reference_outputs(version.weights, version.fmt, rows)
    np.testing.assert_allclose(seen["output"], expected, rtol=1e-5, atol=1e-6)


def test_without_a_signature_a_bad_shape_fails_only_its_caller(tmp_path) -> None:
    """The proxy cannot check the shape, so the model server refuses it inside a batch;
    the proxy splits the batch and only that caller gets the server's 4xx."""
    repo = make_model_repo(tmp_path / "project")
    version = publish_demo(repo, seed=3, signature=None)
    env = {"NEXUS_CACHE_DIR": str(tmp_path / "cache")}
    with ModelServerProcess(env, repo, log=tmp_path / "server.log") as server:
        server.wait_ready()
        proxy = start_proxy(
            tmp_path, {"NEXUS_MODEL_SERVER_URL": server.url, "NEXUS_MAX_WAIT_MS": "50"}
        )
        try:
            wait_until(lambda: http("GET", proxy.url + "/readyz")[0] == 200, 60)
            inputs = np.random.default_rng(2).normal(size=(80, 8)).astype(np.float32).tolist()
            inputs[33] = [1.0, 2.0, 3.0]  # the model takes 8 features
            answers = asyncio.run(predict_all(proxy.url, inputs, connections=80))
            good = np.asarray([x for i, x in enumerate(inputs) if i != 33], dtype=np.float32)
            expected = iter(reference_outputs(version.weights, version.fmt, good))
            for index, (status, body) in enumerate(answers):
                if index == 33:
                    assert 400 <= status < 500, body
                    assert set(body["error"]) == {"message", "type", "code"}
                else:
                    assert status == 200, body
                    np.testing.assert_allclose(body["output"], next(expected), rtol=1e-5, atol=1e-6)
        finally:
            proxy.kill()


def test_model_server_killed_mid_load_and_restarted(tmp_path, published) -> None:
    repo, version = published
    env = {"NEXUS_CACHE_DIR": str(tmp_path / "cache")}
    server = ModelServerProcess(env, repo, log=tmp_path / "server.log").start()
    proxy = None
    try:
        server.wait_ready()
        proxy = start_proxy(tmp_path, {"NEXUS_MODEL_SERVER_URL": server.url})
        wait_until(lambda: http("GET", proxy.url + "/readyz")[0] == 200, 60)

        async def load_while_killing():
            connector = aiohttp.TCPConnector(limit=64)
            timeout = aiohttp.ClientTimeout(total=60)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

                async def one(i):
                    begin = time.monotonic()
                    async with session.post(
                        proxy.url + "/predict",
                        data=json.dumps({"input": [float(i)] * 8}).encode(),
                        headers=JSON_HEADERS,
                    ) as response:
                        await response.read()
                        return response.status, time.monotonic() - begin

                async def waves():
                    results = []
                    for wave in range(40):
                        results += await asyncio.gather(*(one(wave * 64 + i) for i in range(64)))
                    return results

                task = asyncio.ensure_future(waves())
                await asyncio.sleep(0.5)
                server.kill()
                return await task

        answers = asyncio.run(load_while_killing())
        statuses = Counter(status for status, _ in answers)
        assert set(statuses) <= {200, 502, 503}, statuses
        assert statuses[200] > 0
        assert statuses[502] + statuses[503] > 0
        assert max(elapsed for _, elapsed in answers) < 35  # none hung past the timeout

        restarted = ModelServerProcess(env, repo, port=server.port, log=tmp_path / "again.log")
        with restarted:
            restarted.wait_ready()
            wait_until(lambda: http("GET", proxy.url + "/readyz")[0] == 200, 30, "ready again")
            status, _, body = http("POST", proxy.url + "/predict", {"input": [0.5] * 8})
            assert status == 200, body
            expected = reference_outputs(version.weights, version.fmt, [[0.5] * 8])[0]
            np.testing.assert_allclose(json.loads(body)["output"], expected, rtol=1e-5, atol=1e-6)
    finally:
        if proxy is not None:
            proxy.kill()
        server.kill()


def test_a_reload_behind_the_proxy_switches_versions(tmp_path) -> None:
    """After /admin/reload the proxy sees the new commit in an answer and re-reads the
    metadata: v2 lists the new version and the old one is 404. (A changed signature taking
    effect is tested with the fake model server in test_proxy.py.)"""
    repo = make_model_repo(tmp_path / "project")
    first = publish_demo(repo, seed=1)
    env = {"NEXUS_CACHE_DIR": str(tmp_path / "cache")}
    with ModelServerProcess(env, repo, log=tmp_path / "server.log") as server:
        server.wait_ready()
        proxy = start_proxy(tmp_path, {"NEXUS_MODEL_SERVER_URL": server.url})
        try:
            wait_until(lambda: http("GET", proxy.url + "/readyz")[0] == 200, 60)
            second = publish_demo(repo, seed=2)
            status, _, body = http("POST", server.url + "/admin/reload", b"")
            assert status == 200, body
            assert json.loads(body)["to_commit"] == second.commit

            def answered_by_second() -> bool:
                status, _, body = http("POST", proxy.url + "/predict", {"input": [0.25] * 8})
                return status == 200 and json.loads(body)["model"]["commit_hash"] == second.commit

            wait_until(answered_by_second, 30, "answers from the new version")
            status, _, body = http("POST", proxy.url + "/predict", {"input": [0.25] * 8})
            expected = reference_outputs(second.weights, second.fmt, [[0.25] * 8])[0]
            np.testing.assert_allclose(json.loads(body)["output"], expected, rtol=1e-5, atol=1e-6)

            def versions() -> list[str]:
                return json.loads(http("GET", proxy.url + "/v2/models/demo")[2])["versions"]

            wait_until(lambda: versions() == [second.commit], 30, "v2 lists the new commit")
            old = f"/v2/models/demo/versions/{first.commit}/ready"
            assert http("GET", proxy.url + old)[0] == 404  # no longer served
        finally:
            proxy.kill()
