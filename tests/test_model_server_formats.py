"""Every format the server loads gives the outputs torch gives, for batches of 1, 7 and 32.

One server per format; the demo classifier is stored with a signature as TorchScript,
and without one otherwise (torch.export derives it; state_dict and safetensors are
served with no signature, built by the demo factory)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.servers import (
    SIGNATURE_8_IN,
    ModelServerProcess,
    Published,
    make_model_repo,
    publish_demo,
    reference_outputs,
)

FORMATS = ("torchscript", "torch_export", "state_dict", "safetensors")


@pytest.fixture(scope="module", params=FORMATS)
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Published, httpx.Client]]:
    fmt = request.param
    repo = make_model_repo(tmp_path_factory.mktemp(fmt) / "project")
    signature = SIGNATURE_8_IN if fmt == "torchscript" else None
    version = publish_demo(repo, seed=7, fmt=fmt, signature=signature)
    env = {
        "NEXUS_CACHE_DIR": str(repo.parent / "cache"),
        "NEXUS_MODEL_FACTORY": "model_server.demo:build_model",
    }
    with ModelServerProcess(env, repo, log=repo.parent / "server.log") as server:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=30, trust_env=False) as client:
            yield version, client


@pytest.mark.parametrize("size", [1, 7, 32])
def test_outputs_equal_torch(served: tuple[Published, httpx.Client], size: int) -> None:
    version, client = served
    inputs = np.random.default_rng(size).normal(size=(size, 8)).astype(np.float32).tolist()
    response = client.post("/predict/batch", json={"inputs": inputs})
    assert response.status_code == 200, response.text
    assert response.json()["model"]["commit_hash"] == version.commit
    expected = reference_outputs(version.weights, version.fmt, inputs)
    np.testing.assert_allclose(np.asarray(response.json()["outputs"]), expected, rtol=1e-6)


def test_metadata_names_the_format_and_signature(served: tuple[Published, httpx.Client]) -> None:
    version, client = served
    model = client.get("/v1/metadata").json()["model"]
    assert model["format"] == version.fmt
    assert model["sha256"] == version.record.sha256
    signature = model["signature"]
    if version.fmt in ("torchscript", "torch_export"):  # stored, or derived from the program
        assert signature["inputs"][0]["shape"] == [-1, 8]
        assert signature["outputs"][0]["shape"] == [-1, 2]
    else:  # nothing known: -1
        assert signature["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1]}]


def test_samples_of_several_shapes(served: tuple[Published, httpx.Client]) -> None:
    """With no input shape known, samples of different shapes run in one forward pass per
    shape and come back in request order; with a known shape, the odd one is refused."""
    version, client = served
    rng = np.random.default_rng(3)
    flat = rng.normal(size=(3, 8)).astype(np.float32)
    stacked = rng.normal(size=(2, 2, 8)).astype(np.float32)  # a sample of shape [2, 8]
    inputs = [flat[0].tolist(), stacked[0].tolist(), flat[1].tolist(), stacked[1].tolist(),
              flat[2].tolist()]  # fmt: skip
    response = client.post("/predict/batch", json={"inputs": inputs})
    if version.fmt in ("torchscript", "torch_export"):
        assert response.status_code == 422, response.text
        assert "inputs[1]: expected shape [8], got [2, 8]" in response.json()["error"]["message"]
        return
    assert response.status_code == 200, response.text
    outputs = response.json()["outputs"]
    flat_out = reference_outputs(version.weights, version.fmt, flat)
    stacked_out = reference_outputs(version.weights, version.fmt, stacked)
    expected = [flat_out[0], stacked_out[0], flat_out[1], stacked_out[1], flat_out[2]]
    for got, want in zip(outputs, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)

    # nothing to check a sample against: the model's own failure is the client's 422
    wrong = client.post("/predict/batch", json={"inputs": [[1.0] * 5]})
    assert wrong.status_code == 422, wrong.text
    assert wrong.json()["error"]["code"] == "model_error"
    assert client.get("/readyz").status_code == 200


def test_weights_stay_where_the_cache_put_them(served: tuple[Published, httpx.Client]) -> None:
    version, client = served
    weights = client.get("/readyz").json()["checks"]["weights"]
    assert version.record.sha256 in weights
    assert Path(weights.split(": ", 2)[-1]).is_file()
