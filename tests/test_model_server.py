"""The model server as a process: readiness, discovery, predictions, bad input, limits, auth,
framework errors, metrics. One server for the module (TorchScript demo model, local store,
a token, small limits so that the limits are cheap to hit)."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.servers import (
    ModelServerProcess,
    Published,
    make_model_repo,
    publish_demo,
    reference_outputs,
)

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BODY = 64 * 1024
MAX_BATCH = 64
BODY_TIMEOUT_S = 3


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Published]:
    repo = make_model_repo(tmp_path_factory.mktemp("served") / "project")
    return repo, publish_demo(repo, seed=1)


@pytest.fixture(scope="module")
def server(
    published: tuple[Path, Published], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ModelServerProcess]:
    repo, _ = published
    env = {
        "NEXUS_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
        "NEXUS_API_TOKEN": TOKEN,
        "NEXUS_MAX_BODY_BYTES": str(MAX_BODY),
        "NEXUS_SERVER_MAX_BATCH": str(MAX_BATCH),
        "NEXUS_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
    }
    with ModelServerProcess(env, repo, log=tmp_path_factory.mktemp("log") / "server.log") as proc:
        proc.wait_ready()
        yield proc


@pytest.fixture(scope="module")
def client(server: ModelServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30, trust_env=False) as http:
        yield http


def predict(client: httpx.Client, inputs: list) -> httpx.Response:
    return client.post("/predict/batch", json={"inputs": inputs}, headers=AUTH)


def assert_error(response: httpx.Response, status: int, fragment: str = "") -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "code"}, body
    assert fragment in body["error"]["message"], body
    return body["error"]


def test_ready_with_every_step_checked(client: httpx.Client, published) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    document = response.json()
    assert document["status"] == "ready"
    for step in ("metadata", "weights", "load", "warmup"):
        assert document["checks"][step].startswith("ok"), document
    assert published[1].commit[:7] in document["checks"]["model"]
    assert client.get("/health").json() == {"status": "ok"}


def test_metadata_document(client: httpx.Client, published) -> None:
    record = published[1].record
    document = client.get("/v1/metadata").json()
    assert set(document) == {
        "schema_version", "service", "capabilities", "endpoints", "model", "limits"
    }  # fmt: skip
    assert document["schema_version"] == "v1"
    assert document["service"]["name"] == "nexus-model-server"
    assert document["model"] == {
        "name": "demo",
        "commit_hash": record.commit_hash,
        "sha256": record.sha256,
        "format": "torchscript",
        "device": "cpu",
        "signature": {
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 8]}],
            # the stored signature left the output open; the warm-up measured it
            "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 2]}],
        },
    }
    assert document["limits"] == {
        "max_batch_size": MAX_BATCH,
        "max_concurrency": 2,
        "max_body_bytes": MAX_BODY,
    }
    operations = {(e["method"], e["path"]): e["operation_id"] for e in document["endpoints"]}
    assert operations[("POST", "/predict/batch")] == "predict_batch"
    assert operations[("POST", "/admin/reload")] == "reload"
    assert ("GET", "/readyz") in operations
    assert document["capabilities"]["auth"] is True


@pytest.mark.parametrize("size", [1, 7, 32])
def test_outputs_equal_torch(client: httpx.Client, published, size: int) -> None:
    inputs = np.random.default_rng(size).normal(size=(size, 8)).astype(np.float32).tolist()
    response = predict(client, inputs)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == {"name": "demo", "commit_hash": published[1].commit}
    expected = reference_outputs(published[1].weights, "torchscript", inputs)
    np.testing.assert_allclose(np.asarray(body["outputs"], np.float32), expected, rtol=1e-6)


def test_integers_are_taken_as_floats(client: httpx.Client, published) -> None:
    response = predict(client, [[1, 2, 3, 4, 5, 6, 7, 8]])
    assert response.status_code == 200, response.text
    expected = reference_outputs(published[1].weights, "torchscript", [[1, 2, 3, 4, 5, 6, 7, 8]])
    np.testing.assert_allclose(response.json()["outputs"], expected, rtol=1e-6)


GOOD = [0.5] * 8
BAD_BODIES = {
    "shape": ({"inputs": [GOOD, GOOD, GOOD, [0.5] * 7]}, 422, "inputs[3]: expected shape [8], got [7]"),  # noqa: E501
    "ragged": ({"inputs": [GOOD, [[1, 2], [3]]]}, 422, "inputs[1]: not a rectangular array"),
    "rank": ({"inputs": [[GOOD]]}, 422, "inputs[0]: expected shape [8], got [1, 8]"),
    "strings": ({"inputs": [["a"] * 8]}, 422, "inputs[0]: expected numbers (FP32), got strings"),
    "booleans": ({"inputs": [[True] * 8]}, 422, "inputs[0]: expected numbers (FP32), got a boolean"),  # noqa: E501
    "boolean among numbers": ({"inputs": [GOOD, [1, 2, 3, 4, 5, 6, 7, False]]}, 422, "inputs[1]: expected numbers (FP32), got a boolean"),  # noqa: E501
    "null": ({"inputs": [[None] * 8]}, 422, "inputs[0]: expected numbers (FP32), got null"),
    "object": ({"inputs": [{"x": 1}]}, 422, "inputs[0]: expected numbers"),
    "outside fp32": ({"inputs": [[1e39] * 8]}, 422, "inputs[0]: a value is outside FP32's range"),
    "deep nesting": ({"inputs": [json.loads("[" * 40 + "1" + "]" * 40)]}, 422, "inputs[0]:"),
    "empty batch": ({"inputs": []}, 422, "empty batch"),
    "over max batch": ({"inputs": [GOOD] * (MAX_BATCH + 1)}, 413, "at most 64"),
    "no inputs": ({"samples": [GOOD]}, 400, '{"inputs": [sample, ...]}'),
    "inputs not a list": ({"inputs": 3}, 400, "must be a list"),
    "not an object": ([GOOD], 400, '{"inputs": [sample, ...]}'),
}  # fmt: skip
RAW_BODIES = {
    "not json": (b"inputs=1", 400, "not valid JSON"),
    "infinity": (b'{"inputs": [[1e999, 1, 1, 1, 1, 1, 1, 1]]}', 400, "infinity"),
    "nan literal": (b'{"inputs": [[NaN, 1, 1, 1, 1, 1, 1, 1]]}', 400, "not valid JSON"),
    "deeper than JSON allows": (b'{"inputs": [' + b"[" * 5000 + b"]" * 5000 + b"]}", 400, "JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_bad_input_says_what_and_where(client: httpx.Client, case: str) -> None:
    body, status, fragment = BAD_BODIES[case]
    response = client.post("/predict/batch", json=body, headers=AUTH)
    assert_error(response, status, fragment)


@pytest.mark.parametrize("case", sorted(RAW_BODIES))
def test_bad_json_is_refused(client: httpx.Client, case: str) -> None:
    body, status, fragment = RAW_BODIES[case]
    headers = {**AUTH, "Content-Type": "application/json"}
    assert_error(client.post("/predict/batch", content=body, headers=headers), status, fragment)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_wrong_content_type(client: httpx.Client, content_type: str | None) -> None:
    headers = dict(AUTH)
    if content_type:
        headers["Content-Type"] = content_type
    body = json.dumps({"inputs": [GOOD]}).encode()
    error = assert_error(client.post("/predict/batch", content=body, headers=headers), 415)
    assert error["code"] == "unsupported_media_type"


def test_still_ready_after_bad_input(client: httpx.Client) -> None:
    for body, _, _ in BAD_BODIES.values():
        client.post("/predict/batch", json=body, headers=AUTH)
    assert client.get("/readyz").status_code == 200
    assert predict(client, [GOOD]).status_code == 200


def test_body_over_the_limit_is_413(client: httpx.Client) -> None:
    big = json.dumps({"inputs": [[0.123456789] * 8] * 1000}).encode()
    assert len(big) > MAX_BODY
    headers = {**AUTH, "Content-Type": "application/json"}
    error = assert_error(client.post("/predict/batch", content=big, headers=headers), 413)
    assert error["code"] == "body_too_large"


def test_chunked_body_over_the_limit_is_413(client: httpx.Client) -> None:
    """No Content-Length: the server counts the bytes as they stream in."""
    headers = {**AUTH, "Content-Type": "application/json"}

    def chunks(total: int) -> Iterator[bytes]:
        yield b'{"inputs": ['
        sent = 0
        while sent < total:
            piece = b"[1,2,3,4,5,6,7,8],"
            sent += len(piece)
            yield piece
        yield b"[1,2,3,4,5,6,7,8]]}"

    response = client.post("/predict/batch", content=chunks(MAX_BODY + 1000), headers=headers)
    assert "content-length" not in response.request.headers
    assert_error(response, 413, str(MAX_BODY))
    small = client.post("/predict/batch", content=chunks(200), headers=headers)
    assert small.status_code == 200, small.text
    assert len(small.json()["outputs"]) == 13


def start_trickle(server: ModelServerProcess, declared: int, first: bytes) -> socket.socket:
    """A client that declares a body of ``declared`` bytes, sends ``first`` and stalls."""
    connection = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    head = (
        f"POST /predict/batch HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
    )
    connection.sendall(head.encode() + first)
    return connection


def answer_of(connection: socket.socket) -> tuple[int, dict]:
    received = b""
    while b"\r\n\r\n" not in received or not received.rstrip().endswith(b"}"):
        piece = connection.recv(65536)
        if not piece:
            break
        received += piece
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_a_stalled_body_times_out_with_408(server: ModelServerProcess) -> None:
    """A client that sends part of its body and stops (slowloris) is answered 408 once
    NEXUS_BODY_TIMEOUT_S has passed, instead of holding its connection forever."""
    with start_trickle(server, 1000, b'{"inputs": [[1, 2') as stalled:
        status, document = answer_of(stalled)
    assert status == 408, document
    assert document["error"]["code"] == "request_timeout"
    assert "NEXUS_BODY_TIMEOUT_S" in document["error"]["message"]


def test_bodies_in_flight_share_a_bounded_budget(
    server: ModelServerProcess, client: httpx.Client
) -> None:
    """Bodies held at once are bounded (4 x NEXUS_MAX_BODY_BYTES): past that, 503 with
    Retry-After, and the bytes are given back when those requests end."""
    almost_whole = MAX_BODY - 100
    padded = b" " * 30000 + json.dumps({"inputs": [GOOD]}).encode()  # 30 kB more: too much
    headers = {**AUTH, "Content-Type": "application/json"}
    stalled = [start_trickle(server, MAX_BODY, b" " * almost_whole) for _ in range(4)]
    try:
        deadline = time.monotonic() + 10  # until the server has read what they sent
        while body_bytes_in_flight(client) < 4 * almost_whole:
            assert time.monotonic() < deadline, body_bytes_in_flight(client)
            time.sleep(0.05)
        full = client.post("/predict/batch", content=padded, headers=headers)
        error = assert_error(full, 503, "in flight")
        assert error["code"] == "queue_full"
        assert int(full.headers["retry-after"]) >= 1
    finally:
        for connection in stalled:
            connection.close()
    deadline = time.monotonic() + 10  # the closed requests end and give their bytes back
    while body_bytes_in_flight(client) > 0:
        assert time.monotonic() < deadline, body_bytes_in_flight(client)
        time.sleep(0.05)
    again = client.post("/predict/batch", content=padded, headers=headers)
    assert again.status_code == 200, again.text


def body_bytes_in_flight(client: httpx.Client) -> float:
    text = client.get("/metrics").text
    metric = re.search(r"^nexus_server_body_bytes_in_flight (\S+)$", text, re.M)
    assert metric is not None
    return float(metric.group(1))


def test_auth_guards_prediction_and_reload(client: httpx.Client) -> None:
    body = {"inputs": [GOOD]}
    missing = client.post("/predict/batch", json=body)
    assert_error(missing, 401)
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = client.post("/predict/batch", json=body, headers={"Authorization": "Bearer nope"})
    assert_error(wrong, 401)
    assert_error(client.post("/predict/batch", json=body, headers={"Authorization": TOKEN}), 401)
    assert_error(client.post("/admin/reload"), 401)
    assert client.post("/admin/reload", headers=AUTH).status_code == 200
    for open_path in ("/health", "/readyz", "/v1/metadata", "/metrics", "/openapi.json", "/docs"):
        assert client.get(open_path).status_code == 200, open_path


def test_framework_errors_in_our_shape(client: httpx.Client) -> None:
    assert_error(client.get("/no/such/route"), 404, "/no/such/route")
    not_allowed = client.get("/predict/batch", headers=AUTH)
    assert_error(not_allowed, 405, "GET")
    assert "POST" in not_allowed.headers["allow"]
    assert_error(client.delete("/health"), 405)


def test_openapi_documents_the_routes(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    predict_op = spec["paths"]["/predict/batch"]["post"]
    assert predict_op["operationId"] == "predict_batch"
    assert "inputs" in json.dumps(predict_op["requestBody"])
    assert {"/health", "/readyz", "/v1/metadata", "/admin/reload", "/metrics"} <= set(spec["paths"])
    assert "swagger" in client.get("/docs").text.lower()


def test_metrics(client: httpx.Client, published) -> None:
    predict(client, [GOOD] * 3)
    client.post("/predict/batch", json={"inputs": []}, headers=AUTH)
    text = client.get("/metrics").text
    commit = published[1].commit
    assert f'nexus_server_model_info{{commit_hash="{commit}",device="cpu"' in text
    for name in (
        "nexus_server_batches_total",
        "nexus_server_batch_size_bucket",
        "nexus_server_queue_depth",
        "nexus_server_inference_seconds_bucket",
        "nexus_server_decode_seconds_bucket",
        'nexus_server_load_seconds{step="weights"}',
        'nexus_server_errors_total{code="empty_batch"}',
    ):
        assert name in text, name
