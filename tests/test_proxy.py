"""The proxy as a process in front of a fake model server we control (tests/fake_backend.py).

Real HTTP on 127.0.0.1: batching under concurrency, each caller's own answer, errors
reaching only their caller, overload, timeouts, a model server killed and restarted,
replicas, auth, body limits, request ids, metadata re-reads, shutdown drain.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

import aiohttp
import pytest

from tests.fake_backend import (
    ROOT,
    Process,
    control,
    free_port,
    http,
    metric,
    start_fake_backend,
    start_proxy,
    stats,
    wait_until,
)

JSON_HEADERS = {"Content-Type": "application/json"}
pytestmark = pytest.mark.timeout(120)


def predict(proxy: Process, sample, headers: dict | None = None, timeout: float = 30):
    status, head, body = http("POST", proxy.url + "/predict", {"input": sample}, headers, timeout)
    return status, {k.lower(): v for k, v in head.items()}, json.loads(body)


async def predict_many(url: str, samples: list, connections: int = 500, headers=None):
    """Every sample as its own concurrent /predict; (status, body) in the same order."""
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(sample):
            async with session.post(
                url + "/predict",
                data=json.dumps({"input": sample}).encode(),
                headers={**JSON_HEADERS, **(headers or {})},
            ) as response:
                return response.status, await response.json(content_type=None)

        return await asyncio.gather(*(one(s) for s in samples))


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    process = start_fake_backend(tmp_path_factory.mktemp("backend"))
    yield process
    process.kill()


@pytest.fixture(scope="module")
def proxy(backend, tmp_path_factory):
    process = start_proxy(
        tmp_path_factory.mktemp("proxy"),
        {"NEXUS_MODEL_SERVER_URL": backend.url, "NEXUS_MAX_WAIT_MS": "20"},
        ready=True,
    )
    yield process
    process.kill()


@pytest.fixture(autouse=True)
def _reset(request):
    if "backend" in request.fixturenames:
        backend = request.getfixturevalue("backend")
        control(backend, delay=0.0, ready=True, force_status=None)


def test_500_concurrent_predictions_each_get_their_own_answer(proxy, backend) -> None:
    control(backend, delay=0.02)  # a model that takes time, so requests pile up
    before = http("GET", proxy.url + "/metrics")[2].decode()
    samples = [[i, i + 0.5, -0.0, i * 3.0] for i in range(500)]
    answers = asyncio.run(predict_many(proxy.url, samples))
    for sample, (status, body) in zip(samples, answers, strict=True):
        assert status == 200, body
        assert body["output"] == [2 * x for x in sample]
        assert body["model"] == {"name": "doubler", "commit_hash": "a" * 40}
    after = http("GET", proxy.url + "/metrics")[2].decode()
    batches = metric(after, "nexus_proxy_batch_size_count") - metric(
        before, "nexus_proxy_batch_size_count"
    )
    samples_sent = metric(after, "nexus_proxy_batch_size_sum") - metric(
        before, "nexus_proxy_batch_size_sum"
    )
    assert samples_sent == 500
    assert batches < 250  # batches of more than one formed under load
    assert max(stats(backend)["batch_sizes"]) <= 32  # NEXUS_MAX_BATCH_SIZE's default
    assert stats(backend)["most_running"] <= 2  # the server's limits.max_concurrency


def test_a_lone_request_is_not_held_for_the_window(tmp_path, backend) -> None:
    proxy = start_proxy(
        tmp_path, {"NEXUS_MODEL_SERVER_URL": backend.url, "NEXUS_MAX_WAIT_MS": "20000"}, ready=True
    )
    try:
        begin = time.monotonic()
        status, _, body = predict(proxy, [1, 2, 3, 4])
        assert status == 200, body
        assert time.monotonic() - begin < 10  # a 20 s window would have held it
    finally:
        proxy.kill()


def test_a_sample_the_model_refuses_fails_only_its_caller(proxy, backend) -> None:
    control(backend, delay=0.02)
    samples = [[i, 1, 2, 3] for i in range(60)]
    samples[17] = [1, -5, 2, 3]  # the fake model refuses negatives with a 422
    samples[40] = [1, 2, 3]  # wrong shape: the proxy refuses it before it joins a batch
    answers = asyncio.run(predict_many(proxy.url, samples))
    for index, (status, body) in enumerate(answers):
        if index == 17:
            assert status == 422
            assert body["error"]["code"] == "invalid_input"
            assert "refuses negative values" in body["error"]["message"]
        elif index == 40:
            assert status == 422
            assert body["error"]["message"] == "input: expected shape [4], got [3]"
        else:
            assert status == 200, body
            assert body["output"] == [2 * x for x in samples[index]]


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"not json", 400, "not JSON"),
        (b'{"inputs": [1, 2, 3, 4]}', 400, '{"input"'),
        (b'{"input": [1, 2, "x", 4]}', 422, "strings"),
        (b'{"input": [1, 2, true, 4]}', 422, "booleans"),
        (b'{"input": [1, 2, NaN, 4]}', 400, "not JSON"),
        (b'{"input": [1, 2, 1e39, 4]}', 422, "range"),
        (b'{"input": [[1, 2], [3]]}', 422, "rectangular"),
    ],
)
def test_bad_requests_are_refused_in_the_shared_error_shape(proxy, body, status, fragment):
    got, headers, raw = http(
        "POST", proxy.url + "/predict", body, {"Content-Type": "application/json"}
    )
    document = json.loads(raw)
    assert got == status, document
    assert set(document["error"]) == {"message", "type", "code"}
    assert fragment in document["error"]["message"]


def test_unknown_route_and_method_answer_in_our_shape(proxy) -> None:
    status, _, body = http("GET", proxy.url + "/nope")
    assert status == 404
    assert json.loads(body)["error"]["type"] == "not_found_error"
    status, _, body = http("GET", proxy.url + "/predict")
    assert status == 405
    assert json.loads(body)["error"]["code"] == "method_not_allowed"


def test_request_id_is_returned_and_passed_to_the_model_server(proxy, backend) -> None:
    status, headers, _ = predict(proxy, [1, 2, 3, 4], {"X-Request-ID": "trace-42"})
    assert status == 200
    assert headers["x-request-id"] == "trace-42"
    assert any("trace-42" in ids.split(",") for ids in stats(backend)["request_ids"])
    status, headers, _ = predict(proxy, [1, 2, 3, 4])
    assert len(headers["x-request-id"]) == 32  # made when not given
    status, headers, _ = predict(proxy, [1, 2, 3], {"X-Request-ID": "bad-one"})
    assert status == 422
    assert headers["x-request-id"] == "bad-one"  # errors carry it too


def test_request_timeout_header_gives_504(proxy, backend) -> None:
    control(backend, delay=3.0)
    begin = time.monotonic()
    status, _, body = predict(proxy, [1, 2, 3, 4], {"X-Request-Timeout": "0.3"})
    assert status == 504, body
    assert body["error"]["type"] == "timeout_error"
    assert time.monotonic() - begin < 2.5
    status, _, body = predict(proxy, [1, 2, 3, 4], {"X-Request-Timeout": "soon"})
    assert status == 400


def test_body_over_the_limit_is_413_chunked_too(tmp_path, backend) -> None:
    proxy = start_proxy(
        tmp_path, {"NEXUS_MODEL_SERVER_URL": backend.url, "NEXUS_MAX_BODY_BYTES": "1000"}
    )
    try:
        big = json.dumps({"input": list(range(400))}).encode()
        status, _, body = http("POST", proxy.url + "/predict", big)
        assert status == 413
        assert json.loads(body)["error"]["code"] == "body_too_large"
        # chunked: no Content-Length, so the limit must hold while reading
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as conn:
            conn.sendall(
                b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                b"Content-Type: application/json\r\n\r\n"
            )
            for start in range(0, len(big), 200):
                piece = big[start : start + 200]
                conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            conn.sendall(b"0\r\n\r\n")
            answer = conn.recv(65536)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    finally:
        proxy.kill()


def test_auth_guards_prediction_and_leaves_health_open(tmp_path, backend) -> None:
    proxy = start_proxy(
        tmp_path,
        {
            "NEXUS_MODEL_SERVER_URL": backend.url,
            "NEXUS_API_TOKEN": "s3cret",
            "NEXUS_MODEL_SERVER_TOKEN": "",
        },
        ready=True,
    )
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            status, _, body = predict(proxy, [1, 2, 3, 4], headers)
            assert status == 401
            assert body["error"]["type"] == "authentication_error"
        status, _, _ = predict(proxy, [1, 2, 3, 4], {"Authorization": "Bearer s3cret"})
        assert status == 200
        for path in ("/v2/models/doubler", "/v1/models"):
            assert http("GET", proxy.url + path)[0] == 401
        for path in (
            "/health", "/readyz", "/v1/metadata", "/metrics", "/v2/health/live",
            "/v2/health/ready", "/openapi.json", "/docs",
        ):  # fmt: skip
            assert http("GET", proxy.url + path)[0] == 200, path
    finally:
        proxy.kill()


def test_token_is_sent_to_the_model_server(tmp_path) -> None:
    backend = start_fake_backend(tmp_path, token="hop-token")
    wrong = right = None
    try:
        wrong = start_proxy(
            tmp_path, {"NEXUS_MODEL_SERVER_URL": backend.url, "NEXUS_MODEL_SERVER_TOKEN": "nope"}
        )
        right = start_proxy(
            tmp_path, {"NEXUS_MODEL_SERVER_URL": backend.url, "NEXUS_API_TOKEN": "hop-token"}
        )
        wait_until(lambda: http("GET", wrong.url + "/readyz")[0] == 200)
        wait_until(lambda: http("GET", right.url + "/readyz")[0] == 200)
        status, _, body = predict(wrong, [1, 2, 3, 4])
        assert status == 502
        assert "NEXUS_MODEL_SERVER_TOKEN" in body["error"]["message"]
        headers = {"Authorization": "Bearer hop-token"}
        assert predict(right, [1, 2, 3, 4], headers)[0] == 200  # NEXUS_API_TOKEN by default
    finally:
        for process in (wrong, right, backend):
            if process is not None:
                process.kill()


def test_full_queue_is_refused_at_once_with_retry_after(tmp_path, backend) -> None:
    control(backend, delay=2.0, limits={"max_concurrency": 1})
    proxy = start_proxy(
        tmp_path,
        {
            "NEXUS_MODEL_SERVER_URL": backend.url,
            "NEXUS_MAX_QUEUE": "1",
            "NEXUS_MAX_BATCH_SIZE": "1",
        },
        ready=True,
    )
    try:

        async def burst():
            connector = aiohttp.TCPConnector(limit=50)
            async with aiohttp.ClientSession(connector=connector) as session:

                async def one(i):
                    begin = time.monotonic()
                    async with session.post(
                        proxy.url + "/predict",
                        data=json.dumps({"input": [i, 0, 0, 0]}).encode(),
                        headers=JSON_HEADERS,
                    ) as response:
                        await response.read()
                        return response.status, response.headers, time.monotonic() - begin

                return await asyncio.gather(*(one(i) for i in range(30)))

        answers = asyncio.run(burst())
        refused = [a for a in answers if a[0] == 429]
        assert len(refused) >= 25  # 1 in flight + 1 queued; the rest refused
        assert all(a[1]["Retry-After"] == "1" for a in refused)
        assert all(a[2] < 1.5 for a in refused)  # at once, not after the model's 2 s
        assert {a[0] for a in answers} <= {200, 429}
    finally:
        proxy.kill()
        control(backend, limits={"max_concurrency": 2})


def test_model_server_killed_mid_load_then_restarted(tmp_path) -> None:
    backend = start_fake_backend(tmp_path, delay="0.05")
    proxy = start_proxy(tmp_path, {"NEXUS_MODEL_SERVER_URL": backend.url}, ready=True)
    try:

        async def load_while_killing():
            connector = aiohttp.TCPConnector(limit=64)
            timeout = aiohttp.ClientTimeout(total=40)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

                async def one(i):
                    begin = time.monotonic()
                    async with session.post(
                        proxy.url + "/predict",
                        data=json.dumps({"input": [i, 0, 0, 0]}).encode(),
                        headers=JSON_HEADERS,
                    ) as response:
                        await response.read()
                        return response.status, time.monotonic() - begin

                tasks = [asyncio.ensure_future(one(i)) for i in range(200)]
                await asyncio.sleep(0.15)
                backend.kill()
                return await asyncio.gather(*tasks)

        answers = asyncio.run(load_while_killing())
        statuses = Counter(status for status, _ in answers)
        assert set(statuses) <= {200, 502, 503}, statuses
        assert statuses[502] + statuses[503] > 0
        assert max(elapsed for _, elapsed in answers) < 30  # nothing hung
        wait_until(lambda: http("GET", proxy.url + "/readyz")[0] == 503, what="not ready")
        status, headers, body = predict(proxy, [1, 2, 3, 4])
        assert status == 503
        assert "retry-after" in headers
        # the server comes back on the same port: the proxy serves again by itself
        restarted = start_fake_backend(tmp_path, port=backend.port)
        try:
            wait_until(lambda: http("GET", proxy.url + "/readyz")[0] == 200, what="ready again")
            status, _, body = predict(proxy, [1, 2, 3, 4])
            assert status == 200, body
            assert body["output"] == [2, 4, 6, 8]
        finally:
            restarted.kill()
    finally:
        proxy.kill()
        backend.kill()


def test_replicas_share_the_load_and_a_dead_one_is_skipped(tmp_path) -> None:
    first = start_fake_backend(tmp_path, delay="0.02")
    second = start_fake_backend(tmp_path, delay="0.02")
    dead = f"http://127.0.0.1:{free_port()}"
    urls = ",".join([first.url, dead, second.url])
    proxy = start_proxy(tmp_path, {"NEXUS_MODEL_SERVER_URL": urls}, ready=True)
    try:
        samples = [[i, 0, 0, 1] for i in range(200)]
        answers = asyncio.run(predict_many(proxy.url, samples, connections=100))
        assert all(status == 200 for status, _ in answers)
        assert [body["output"] for _, body in answers] == [[2 * i, 0, 0, 2] for i in range(200)]
        assert sum(stats(first)["batch_sizes"]) > 0
        assert sum(stats(second)["batch_sizes"]) > 0
        readyz = json.loads(http("GET", proxy.url + "/readyz")[2])
        assert readyz["checks"]["model_servers"][dead] != "ready"
    finally:
        for process in (proxy, first, second):
            process.kill()


def test_a_not_ready_model_server_is_skipped_until_it_recovers(proxy, backend) -> None:
    control(backend, ready=False)
    wait_until(lambda: http("GET", proxy.url + "/readyz")[0] == 503, what="proxy not ready")
    status, _, body = predict(proxy, [1, 2, 3, 4])
    assert status == 503
    control(backend, ready=True)
    wait_until(lambda: http("GET", proxy.url + "/readyz")[0] == 200, what="proxy ready again")
    assert predict(proxy, [1, 2, 3, 4])[0] == 200


def test_a_new_commit_makes_the_proxy_reread_the_signature(tmp_path) -> None:
    backend = start_fake_backend(tmp_path)
    proxy = start_proxy(tmp_path, {"NEXUS_MODEL_SERVER_URL": backend.url}, ready=True)
    try:
        assert predict(proxy, [1, 2, 3])[0] == 422  # the signature takes 4 features
        three = {
            "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 3]}],
            "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, 3]}],
        }
        control(backend, model={"commit_hash": "c" * 40, "signature": three})  # a reload
        status, _, body = predict(proxy, [1, 2, 3, 4])  # still checked against the old one
        assert status == 200
        assert body["model"]["commit_hash"] == "c" * 40  # ...answered by the new commit

        def three_features_accepted() -> bool:
            return predict(proxy, [1, 2, 3])[0] == 200

        wait_until(three_features_accepted, 10, "new signature in use")
        document = json.loads(http("GET", proxy.url + "/v1/metadata")[2])
        assert document["model"]["commit_hash"] == "c" * 40
    finally:
        proxy.kill()
        backend.kill()


def test_a_model_failure_for_everyone_is_502(proxy, backend) -> None:
    control(backend, force_status=500)
    status, _, body = predict(proxy, [1, 2, 3, 4])
    assert status == 502
    assert body["error"]["code"] == "model_error"


def test_metadata_models_and_metrics(proxy) -> None:
    document = json.loads(http("GET", proxy.url + "/v1/metadata")[2])
    assert document["schema_version"] == "v1"
    assert document["service"]["name"] == "nexus-proxy"
    assert document["model"]["name"] == "doubler"
    assert document["limits"]["max_batch_size"] == 32
    paths = {(e["path"], e["method"]) for e in document["endpoints"]}
    assert ("/predict", "POST") in paths
    assert ("/v2/models/{name}/infer", "POST") in paths
    models = json.loads(http("GET", proxy.url + "/v1/models")[2])
    assert models["object"] == "list"
    assert models["data"][0]["id"] == "doubler"
    assert models["data"][0]["object"] == "model"
    predict(proxy, [1, 2, 3, 4])
    text = http("GET", proxy.url + "/metrics")[2].decode()
    for name in (
        "nexus_proxy_queue_depth",
        "nexus_proxy_batch_size_bucket",
        "nexus_proxy_queue_wait_seconds_bucket",
        "nexus_proxy_batch_round_trip_seconds_bucket",
        'nexus_proxy_requests_total{code="200",route="predict"}',
    ):
        assert name in text


def test_shutdown_drains_in_flight_requests(tmp_path, backend) -> None:
    control(backend, delay=1.0)
    proxy = start_proxy(tmp_path, {"NEXUS_MODEL_SERVER_URL": backend.url}, ready=True)
    try:

        async def stop_during_request():
            async with aiohttp.ClientSession() as session:
                request = asyncio.ensure_future(
                    session.post(
                        proxy.url + "/predict",
                        data=b'{"input": [1, 2, 3, 4]}',
                        headers=JSON_HEADERS,
                    )
                )
                await asyncio.sleep(0.3)
                proxy.popen.send_signal(signal.SIGTERM)
                response = await request
                return response.status, await response.json()

        status, body = asyncio.run(stop_during_request())
        assert status == 200
        assert body["output"] == [2, 4, 6, 8]
        assert proxy.popen.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
        assert "batch" in proxy.output()
    finally:
        proxy.kill()


def test_bad_settings_stop_the_proxy_with_a_message_naming_the_variable() -> None:
    for env, name in (
        ({"NEXUS_MAX_BATCH_SIZE": "zero"}, "NEXUS_MAX_BATCH_SIZE"),
        ({"NEXUS_MODEL_SERVER_URL": "ftp://x"}, "NEXUS_MODEL_SERVER_URL"),
        ({"NEXUS_ETCD_ENDPOINTS": "http://127.0.0.1:2379"}, "NEXUS_ADVERTISE_URL"),
        ({"NEXUS_PORT": "70000"}, "NEXUS_PORT"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "proxy"],
            cwd=ROOT,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 2
        assert name in done.stderr
        assert "Traceback" not in done.stderr


def test_the_proxy_never_imports_torch_and_starts_fast() -> None:
    code = (
        "import sys, time; t = time.perf_counter(); import proxy.app, proxy.__main__; "
        "print(time.perf_counter() - t); "
        "print('torch' in sys.modules, 'model_server' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    seconds, loaded = done.stdout.splitlines()
    assert loaded == "False False"
    assert float(seconds) < 10  # catches a heavy import; the real figure is in the README


GATEWAY = """
import contextlib, os, sys
import uvicorn
from fastapi import FastAPI
from proxy.routes import create_router
from proxy.service import ProxyService
from proxy.settings import Settings

service = ProxyService(Settings.from_env())

@contextlib.asynccontextmanager
async def lifespan(app):
    async with service.running():
        yield

app = FastAPI(lifespan=lifespan)

@app.get("/gateway/own-route")
async def own():
    return {"gateway": True}

app.include_router(create_router(service), prefix="/ml")
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def test_a_gateway_includes_the_router(tmp_path, backend) -> None:
    port = free_port()
    env = {**os.environ, "NEXUS_MODEL_SERVER_URL": backend.url, "NEXUS_HEALTH_INTERVAL_S": "0.2"}
    with open(tmp_path / "gateway.log", "wb") as log:
        gateway = subprocess.Popen(
            [sys.executable, "-c", GATEWAY, str(port)], cwd=ROOT, env=env, stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http("GET", url + "/ml/readyz")[0] == 200, 30, "gateway ready")
        assert json.loads(http("GET", url + "/gateway/own-route")[2]) == {"gateway": True}
        status, _, body = http("POST", url + "/ml/predict", {"input": [1, 2, 3, 4]})
        assert status == 200, body
        assert json.loads(body)["output"] == [2, 4, 6, 8]
        status, _, body = http("POST", url + "/ml/predict", {"input": [1, 2]})
        assert status == 422  # errors in the shared shape without the standalone app's handlers
        assert json.loads(body)["error"]["code"] == "invalid_input"
    finally:
        gateway.kill()
        gateway.wait(10)
