"""The Open Inference Protocol (KServe v2) routes, with the payload shapes of its spec.

Requests are built by hand (JSON and the binary tensor data extension) and by
tritonclient's HTTP client with its default settings. The model behind the proxy is the
fake doubler (tests/fake_backend.py): input ``features`` FP32 [-1, 4], output ``scores``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.fake_backend import (
    http,
    start_fake_backend,
    start_proxy,
    tritonclient_call,
    wait_until,
)

COMMIT = "a" * 40
JSON_HEADERS = {"Content-Type": "application/json"}


def features(data, shape=(1, 4)) -> dict:
    return {"name": "features", "shape": list(shape), "datatype": "FP32", "data": data}


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("v2")
    backend = start_fake_backend(tmp)
    process = start_proxy(tmp, {"NEXUS_MODEL_SERVER_URL": backend.url, "NEXUS_MAX_WAIT_MS": "5"})
    wait_until(lambda: http("GET", process.url + "/readyz")[0] == 200, what="proxy ready")
    yield process
    process.kill()
    backend.kill()


def get(proxy, path):
    status, _, body = http("GET", proxy.url + path)
    return status, json.loads(body) if body else None


def infer(proxy, path, document, headers=None):
    status, head, body = http(
        "POST", proxy.url + path, json.dumps(document).encode(), {**JSON_HEADERS, **(headers or {})}
    )
    return status, {k.lower(): v for k, v in head.items()}, body


def test_server_health_and_metadata(proxy) -> None:
    assert get(proxy, "/v2/health/live") == (200, {"live": True})
    assert get(proxy, "/v2/health/ready") == (200, {"ready": True})
    status, server = get(proxy, "/v2")
    assert status == 200
    assert server["name"] == "nexus-proxy"
    assert "binary_tensor_data" in server["extensions"]


def test_model_metadata_and_readiness(proxy) -> None:
    status, document = get(proxy, "/v2/models/doubler")
    assert status == 200
    assert document["name"] == "doubler"
    assert document["versions"] == [COMMIT]
    assert document["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}]
    assert document["outputs"] == [{"name": "scores", "datatype": "FP32", "shape": [-1, 4]}]
    assert get(proxy, f"/v2/models/doubler/versions/{COMMIT}")[0] == 200
    assert get(proxy, "/v2/models/doubler/ready") == (200, {"name": "doubler", "ready": True})
    assert get(proxy, f"/v2/models/doubler/versions/{COMMIT}/ready")[0] == 200


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models/other",
        "/v2/models/other/ready",
        "/v2/models/doubler/versions/" + "b" * 40,
        "/v2/models/doubler/versions/1/ready",
    ],
)
def test_unknown_model_or_version_is_404(proxy, path) -> None:
    status, document = get(proxy, path)
    assert status == 404
    assert document["error"]["type"] == "not_found_error"


def test_infer_json_flat_and_nested(proxy) -> None:
    rows = [[1, 2, 3, 4], [5, 6, 7, 8], [0.5, -0.0, 1e-3, 9]]
    for data in (sum(rows, []), rows):
        status, headers, body = infer(
            proxy,
            "/v2/models/doubler/infer",
            {
                "id": "req-1",
                "inputs": [{"name": "features", "shape": [3, 4], "datatype": "FP32", "data": data}],
                "outputs": [{"name": "scores"}],
            },
        )
        assert status == 200, body
        assert headers["content-type"].startswith("application/json")
        document = json.loads(body)
        assert document["model_name"] == "doubler"
        assert document["model_version"] == COMMIT
        assert document["id"] == "req-1"
        (output,) = document["outputs"]
        assert output["name"] == "scores"
        assert output["datatype"] == "FP32"
        assert output["shape"] == [3, 4]
        expected = (2 * np.asarray(rows, dtype=np.float32)).reshape(-1)
        np.testing.assert_allclose(output["data"], expected)


def test_infer_on_a_version_route(proxy) -> None:
    document = {"inputs": [features([1] * 4)]}
    status, _, body = infer(proxy, f"/v2/models/doubler/versions/{COMMIT}/infer", document)
    assert status == 200, body
    assert json.loads(body)["model_version"] == COMMIT
    status, _, _ = infer(proxy, "/v2/models/doubler/versions/" + "b" * 40 + "/infer", document)
    assert status == 404


def test_infer_binary_in_and_out(proxy) -> None:
    rows = np.arange(8, dtype=np.float32).reshape(2, 4)
    raw = rows.astype("<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "features",
                    "shape": [2, 4],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": "scores", "parameters": {"binary_data": True}}],
        }
    ).encode()
    status, headers, body = http(
        "POST",
        proxy.url + "/v2/models/doubler/infer",
        header + raw,
        {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(header)),
        },
    )
    assert status == 200, body
    headers = {k.lower(): v for k, v in headers.items()}
    length = int(headers["inference-header-content-length"])
    document = json.loads(body[:length])
    (output,) = document["outputs"]
    assert output["shape"] == [2, 4]
    assert "data" not in output
    assert output["parameters"]["binary_data_size"] == 32
    values = np.frombuffer(body[length:], dtype="<f4").reshape(output["shape"])
    np.testing.assert_array_equal(values, 2 * rows)


def test_binary_output_for_every_output_when_asked_at_request_level(proxy) -> None:
    status, headers, body = infer(
        proxy,
        "/v2/models/doubler/infer",
        {
            "inputs": [features([1, 2, 3, 4])],
            "parameters": {"binary_data_output": True},
        },
    )
    assert status == 200
    length = int(headers["inference-header-content-length"])
    assert np.frombuffer(body[length:], dtype="<f4").tolist() == [2, 4, 6, 8]


@pytest.mark.parametrize(
    ("document", "status", "fragment"),
    [
        ({"inputs": []}, 400, "exactly one input"),
        ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1] * 4}]}, 400,
         "unknown input 'x'"),
        ({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "BYTES", "data": ["a"]}]},
         400, "BYTES"),
        ({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [1] * 3}]},
         422, "3 values"),
        ({"inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP32", "data": [1] * 3}]},
         422, "expected shape [-1, 4]"),
        ({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32",
                      "data": [1, 2, True, 4]}]}, 422, "booleans"),
        ({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32"}]}, 400,
         "neither 'data'"),
        ({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32",
                      "parameters": {"binary_data_size": 16}}]}, 400, "binary_data_size"),
        ({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [1] * 4}],
          "outputs": [{"name": "nope"}]}, 400, "unknown output"),
        ({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [1] * 4}],
          "parameters": {"timeout": -5}}, 400, "timeout"),
        ({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32",
                      "data": [1, 2, -3, 4]}]}, 422, "refuses negative"),
    ],
)  # fmt: skip
def test_bad_infer_requests(proxy, document, status, fragment) -> None:
    got, _, body = infer(proxy, "/v2/models/doubler/infer", document)
    error = json.loads(body)["error"]
    assert got == status, error
    assert fragment in error["message"]


def test_v2_timeout_parameter_is_microseconds(proxy) -> None:
    status, document = get(proxy, "/readyz")
    backend_url = next(iter(document["checks"]["model_servers"]))
    assert http("POST", backend_url + "/control", {"delay": 2.0})[0] == 200
    try:
        status, _, body = infer(
            proxy,
            "/v2/models/doubler/infer",
            {
                "inputs": [features([1] * 4)],
                "parameters": {"timeout": 200_000},  # 0.2 s
            },
        )
        assert status == 504, body
    finally:
        http("POST", backend_url + "/control", {"delay": 0.0})


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient(proxy, binary) -> None:
    rows = np.random.default_rng(3).random((5, 4), dtype=np.float32)
    seen = tritonclient_call(
        proxy.url, "doubler", rows.tolist(), input_name="features", output_name="scores",
        binary=binary, version=COMMIT if binary else "",
    )  # fmt: skip
    assert (seen["live"], seen["ready"], seen["model_ready"]) == (True, True, True)
    assert seen["metadata"]["inputs"][0]["name"] == "features"
    np.testing.assert_allclose(seen["output"], 2 * rows, rtol=1e-6)
    assert seen["response"]["id"] == "triton-1"
    assert seen["response"]["model_version"] == COMMIT
