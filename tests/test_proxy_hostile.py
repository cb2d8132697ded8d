"""The proxy attacked the way a careless client or an attacker would, over real HTTP.

Callers that hang up (while queued, mid-body), bodies that never finish, hostile v2
payloads (deep nesting, too many dimensions), stray ``true``/``false`` text, a model
server that rolls back to a commit it served before. Each case broke something once.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import aiohttp
import pytest

from tests.fake_backend import (
    SIGNATURE,
    control,
    http,
    metric,
    start_fake_backend,
    start_proxy,
    stats,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)
V2_INFER = "/v2/models/doubler/infer"


def raw_request(path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
    for name, value in (headers or {}).items():
        head += f"{name}: {value}\r\n"
    return head.encode() + b"Content-Length: %d\r\n\r\n" % len(body) + body


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    process = start_fake_backend(tmp_path_factory.mktemp("backend"))
    yield process
    process.kill()


@pytest.fixture(scope="module")
def proxy(backend, tmp_path_factory):
    env = {"NEXUS_MODEL_SERVER_URL": backend.url, "NEXUS_REQUEST_TIMEOUT_S": "3"}
    process = start_proxy(tmp_path_factory.mktemp("proxy"), env, ready=True)
    yield process
    process.kill()


@pytest.fixture(autouse=True)
def _reset(backend):
    control(backend, delay=0.0, ready=True, force_status=None, metadata={})


def test_callers_that_hang_up_while_queued_never_reach_the_model(proxy, backend) -> None:
    # 2 s: the hung-up callers must still be queued when the proxy notices, on a busy CI too
    control(backend, delay=2.0)
    sample = json.dumps({"input": [1, 2, 3, 4]}).encode()
    # two callers fill both of the model server's slots; one after the
    # other, or the proxy may batch them together and leave a slot free
    busy = [
        threading.Thread(target=http, args=("POST", proxy.url + "/predict", sample))
        for _ in range(2)
    ]
    for count, thread in enumerate(busy, start=1):
        thread.start()
        wait_until(lambda n=count: stats(backend)["running"] >= n, 10, f"{count} running")
    gone = []
    for i in range(10):
        conn = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        conn.sendall(raw_request("/predict", sample, {"X-Request-ID": f"gone-{i}"}))
        gone.append(conn)
    time.sleep(0.2)  # they are queued behind the busy slots
    for conn in gone:
        conn.close()
    for thread in busy:
        thread.join(30)
    control(backend, delay=0.0)
    status, _, _ = http("POST", proxy.url + "/predict", sample)  # the queue moves on
    assert status == 200
    seen = ",".join(stats(backend)["request_ids"])
    assert "gone-" not in seen
    text = http("GET", proxy.url + "/metrics")[2].decode()
    assert 'code="499"' in text  # counted as the caller closing, not as our error
    assert "internal_error" not in text


def test_a_body_that_never_finishes_is_408_and_a_hang_up_mid_body_is_no_error(
    proxy, backend
) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=20) as conn:
        conn.sendall(raw_request("/predict", b'{"input": [1, 2, 3, 4]}')[:-8])  # 8 bytes short
        begin = time.monotonic()
        answer = b""
        while not answer.endswith(b"}}") and time.monotonic() - begin < 15:
            answer += conn.recv(65536) or b"}}"
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b'"request_timeout"' in answer
    assert time.monotonic() - begin < 10  # NEXUS_REQUEST_TIMEOUT_S=3 bounds the read
    conn = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    conn.sendall(raw_request(V2_INFER, b'{"inputs": []}')[:-4])
    time.sleep(0.2)
    conn.close()
    time.sleep(0.3)
    assert "Traceback" not in proxy.output()
    text = http("GET", proxy.url + "/metrics")[2].decode()
    assert "internal_error" not in text
    assert metric(text, "nexus_proxy_requests_total") > 0


@pytest.mark.parametrize(
    "tensor",
    [
        {"shape": [1, 4], "data": json.loads("[" * 950 + "1" + "]" * 950)},  # deep nesting
        {"shape": [1] * 70, "data": [1.0]},  # more dimensions than numpy has
    ],
    ids=["deep-data", "70-dims"],
)
def test_hostile_v2_tensors_are_4xx_not_500(proxy, tensor) -> None:
    document = {"inputs": [{"name": "features", "datatype": "FP32", **tensor}]}
    status, _, body = http("POST", proxy.url + V2_INFER, document)
    assert status in (400, 422), body
    assert json.loads(body)["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "where",
    [
        {"parameters": {"binary_data_output": "false"}},
        {"outputs": [{"name": "scores", "parameters": {"binary_data": "false"}}]},
    ],
    ids=["request", "output"],
)
def test_a_v2_binary_flag_that_is_not_a_boolean_is_400(proxy, where) -> None:
    document = {
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4], "data": [1] * 4}],
        **where,
    }
    status, _, body = http("POST", proxy.url + V2_INFER, document)
    assert status == 400, body  # it was answered in binary: bool("false") is True
    assert "true or false" in json.loads(body)["error"]["message"]


def test_true_and_false_outside_the_input_are_not_booleans(proxy) -> None:
    document = {"input": [1, 2, 3, 4], "note": "false alarm", "debug": True}
    status, _, body = http("POST", proxy.url + "/predict", document)
    assert status == 200, body
    assert json.loads(body)["output"] == [2, 4, 6, 8]
    status, _, body = http("POST", proxy.url + "/predict", {"input": [1, 2, True, 4]})
    assert status == 422
    assert "booleans" in json.loads(body)["error"]["message"]


def test_405_names_the_allowed_methods(proxy) -> None:
    status, headers, body = http("GET", proxy.url + "/predict")
    assert status == 405
    assert "POST" in {k.lower(): v for k, v in headers.items()}["allow"]
    assert json.loads(body)["error"]["code"] == "method_not_allowed"


def test_a_rollback_to_a_commit_served_before_is_noticed(tmp_path, backend) -> None:
    first, second = "a" * 40, "b" * 40
    proxy = start_proxy(tmp_path, {"NEXUS_MODEL_SERVER_URL": backend.url}, ready=True)
    try:

        def versions() -> list[str]:
            return json.loads(http("GET", proxy.url + "/v2/models/doubler")[2])["versions"]

        for commit in (second, first):  # a reload, then a rollback
            control(backend, model={"commit_hash": commit})
            assert http("POST", proxy.url + "/predict", {"input": [1, 2, 3, 4]})[0] == 200
            wait_until(lambda commit=commit: versions() == [commit], 10, f"versions [{commit}]")
        document = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4],
                                "data": [1, 2, 3, 4]}]}  # fmt: skip
        status, _, body = http("POST", f"{proxy.url}/v2/models/doubler/versions/{first}/infer",
                               document)  # fmt: skip
        assert status == 200, body
    finally:
        proxy.kill()
        control(backend, model={"commit_hash": "a" * 40})


def test_without_a_signature_a_sample_of_64_dimensions_is_422(tmp_path, backend) -> None:
    control(backend, model={"signature": None})
    proxy = start_proxy(tmp_path, {"NEXUS_MODEL_SERVER_URL": backend.url}, ready=True)
    try:
        deep = json.loads("[" * 64 + "1" + "]" * 64)
        status, _, body = http("POST", proxy.url + "/predict", {"input": deep})
        assert status == 422, body
        assert "dimensions" in json.loads(body)["error"]["message"]
        status, _, body = http("POST", proxy.url + "/predict", {"input": [[1.0, 2.0]]})
        assert status == 200, body  # any shape is served without a signature
    finally:
        proxy.kill()
        control(backend, model={"signature": SIGNATURE})


def test_a_server_busy_with_many_slow_batches_stays_ready(tmp_path) -> None:
    """A server that takes 100 batches at once, each slow: the proxy caps its batches at
    its pool (64) and probes readiness on connections of its own, so the busy server is
    not taken for a dead one (the probe used to wait behind the batches and time out)."""
    backend = start_fake_backend(tmp_path)
    control(backend, limits={"max_concurrency": 100}, delay=7.0)
    env = {"NEXUS_MODEL_SERVER_URL": backend.url, "NEXUS_MAX_BATCH_SIZE": "1"}
    proxy = start_proxy(tmp_path, env, ready=True)
    try:

        async def load() -> list[int]:
            connector = aiohttp.TCPConnector(limit=100)
            async with aiohttp.ClientSession(connector=connector) as session:

                async def one(i: int) -> int:
                    document = {"input": [i, 1, 1, 1]}
                    async with session.post(proxy.url + "/predict", json=document) as response:
                        return response.status

                return await asyncio.gather(*(one(i) for i in range(80)))

        statuses: list[int] = []
        caller = threading.Thread(target=lambda: statuses.extend(asyncio.run(load())))
        caller.start()
        begin, answers = time.monotonic(), []
        while time.monotonic() - begin < 8:
            answers.append(http("GET", proxy.url + "/readyz")[0])
            time.sleep(0.1)
        caller.join(30)
        assert set(answers) == {200}
        assert set(statuses) == {200}
        assert stats(backend)["most_running"] <= 64
    finally:
        proxy.kill()
        backend.kill()


@pytest.mark.parametrize(
    "metadata",
    [{"limits": "lots"}, {"model": "doubler"}, {"limits": {"max_batch_size": "32"}, "model": []}],
    ids=["limits-a-string", "model-a-string", "both-wrong"],
)
def test_metadata_of_the_wrong_shape_is_not_served_and_the_proxy_recovers(
    tmp_path, backend, metadata
) -> None:
    control(backend, metadata=metadata)
    proxy = start_proxy(tmp_path, {"NEXUS_MODEL_SERVER_URL": backend.url})
    try:
        status, _, body = http("GET", proxy.url + "/readyz")
        assert status == 503, body
        assert "/v1/metadata" in body.decode()
        status, _, body = http("POST", proxy.url + "/predict", {"input": [1, 2, 3, 4]}, timeout=10)
        assert status == 503, body
        control(backend, metadata={})  # the server is fixed: the proxy serves by itself
        wait_until(lambda: http("GET", proxy.url + "/readyz")[0] == 200, 10, "ready")
        status, _, body = http("POST", proxy.url + "/predict", {"input": [1, 2, 3, 4]}, timeout=10)
        assert status == 200, body
    finally:
        proxy.kill()
