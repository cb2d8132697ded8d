"""Loading in-process: signatures the server refuses, static export batches, factories."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model_server.demo import TinyClassifier, build_model, save
from model_server.loading import (
    LoadError,
    build_with_weights,
    fetch_weights,
    load_module,
    open_project,
    resolve_device,
    resolve_latest,
)
from model_server.settings import Settings
from nexus_cli.metadata import VersionRecord

CPU = torch.device("cpu")


def record(path: Path, signature: dict | None = None) -> VersionRecord:
    return VersionRecord(
        commit_hash="a" * 40,
        model_name="demo",
        storage_uri=f"demo/{'a' * 40}{path.suffix}",
        sha256="0" * 64,
        size_bytes=path.stat().st_size,
        signature=signature,
    )


def test_a_signature_with_two_inputs_is_refused(tmp_path: Path) -> None:
    weights = save(build_model(), tmp_path / "m.pt", "torchscript")
    two = {
        "inputs": [
            {"name": "a", "datatype": "FP32", "shape": [-1, 8]},
            {"name": "b", "datatype": "FP32", "shape": [-1, 8]},
        ],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
    }
    with pytest.raises(LoadError, match="one input and one output") as caught:
        load_module(weights, record(weights, two), CPU, None)
    assert caught.value.step == "load"


def test_a_static_export_batch_runs_in_chunks(tmp_path: Path) -> None:
    """A program exported without a dynamic batch takes exactly its batch size: the server
    pads and splits instead of failing on every other size."""
    model = build_model().eval()
    program = torch.export.export(model, (torch.zeros(2, 8),))
    path = tmp_path / "static.pt2"
    torch.export.save(program, str(path))
    loaded = load_module(path, record(path), CPU, None)
    assert loaded.fixed_batch == 2
    assert loaded.signature["inputs"][0]["shape"] == [2, 8]
    batch = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    with torch.inference_mode():
        expected = model(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(loaded.forward(batch), expected, rtol=1e-6)


class WithBuffer(TinyClassifier):
    """A buffer outside the state dict: the module cannot be built on the meta device."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.full((2,), 3.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale


def build_with_buffer() -> torch.nn.Module:
    return WithBuffer()


def test_a_factory_with_a_non_persistent_buffer_is_built_for_real(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "factory_under_test", sys.modules[__name__])
    source = build_model()
    module = build_with_weights("factory_under_test:build_with_buffer", "state_dict",
                                source.state_dict(), CPU)  # fmt: skip
    assert not any(t.is_meta for t in module.buffers())
    x = torch.ones(1, 8)
    with torch.inference_mode():
        torch.testing.assert_close(module(x), source(x) * 3.0)


def test_weights_that_do_not_fit_say_so() -> None:
    with pytest.raises(LoadError, match="do not fit"):
        build_with_weights("model_server.demo:build_model", "state_dict",
                           {"nope": torch.zeros(1)}, CPU)  # fmt: skip


def test_a_factory_that_is_not_there() -> None:
    with pytest.raises(LoadError, match="has no missing"):
        build_with_weights("model_server.demo:missing", "state_dict", {}, CPU)
    with pytest.raises(LoadError, match="cannot import"):
        build_with_weights("no_such_module_here:build", "state_dict", {}, CPU)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_where_there_is_none() -> None:
    with pytest.raises(LoadError, match="CUDA is not available"):
        resolve_device("cuda:1")
    assert resolve_device("auto") == CPU


FACTORY_MODULES = {
    # a training script imported for its model class: argparse runs and exits on import
    "exits_on_import": ("import sys\nsys.exit(3)\n", "cannot import exits_on_import: it exited"),
    "exits_in_call": ("import sys\ndef build():\n    sys.exit(4)\n", "failed: it exited"),
    "interrupts": ("def build():\n    raise KeyboardInterrupt\n", "failed: KeyboardInterrupt"),
    "raises": ("def build():\n    raise RuntimeError('boom')\n", "failed: RuntimeError: boom"),
    "syntax_error": ("def build(:\n", "cannot import syntax_error: SyntaxError"),
    "not_callable": ("build = 42\n", "is not callable"),
    "returns_junk": ("def build():\n    return 'a string'\n", "returned str, not a torch.nn"),
}


@pytest.mark.parametrize("name", sorted(FACTORY_MODULES))
def test_a_hostile_factory_is_a_load_error_never_the_end_of_the_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """What a factory's module does on import or call (sys.exit, KeyboardInterrupt, an
    error) fails the load with a message that says what happened: a SystemExit escaping
    the loading thread stopped the whole server."""
    source, message = FACTORY_MODULES[name]
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    weights = build_model().state_dict()
    with pytest.raises(LoadError, match=message) as caught:
        build_with_weights(f"{name}:build", "state_dict", weights, CPU)
    assert f"NEXUS_MODEL_FACTORY={name}:build" in caught.value.message
    sys.modules.pop(name, None)


@pytest.mark.parametrize("kind", ["fifo", "link to /dev/zero", "folder"])
def test_metadata_that_is_not_a_regular_file_says_what_it_is(tmp_path: Path, kind: str) -> None:
    """A metadata file swapped for a FIFO or a link to /dev/zero is refused without
    reading it, and the reason says what is there (it used to say "no metadata")."""
    settings = Settings.from_env({"NEXUS_CACHE_DIR": str(tmp_path / "cache")}, cwd=tmp_path)
    meta = tmp_path / ".nexus_meta.json"  # swapped after the start, before a reload
    if kind == "fifo":
        os.mkfifo(meta)
    elif kind == "folder":
        meta.mkdir()
    else:
        meta.symlink_to("/dev/zero")
    expected = {"fifo": "a FIFO", "link to /dev/zero": "a character device", "folder": "a folder"}
    with pytest.raises(LoadError, match=f"is {expected[kind]}, not a regular file"):
        resolve_latest(settings, open_project(settings))


def test_a_network_error_is_the_store_s_fault_not_the_cache_folder_s(tmp_path: Path) -> None:
    """ConnectionError is an OSError: it was reported as trouble with the cache folder
    (409, "cannot be served") instead of the store (502)."""

    class Unreachable:
        def fetch(self, *_args: object, **_kwargs: object) -> None:
            raise ConnectionError("[Errno 111] Connection refused")

    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x")
    settings = Settings.from_env({"NEXUS_CACHE_DIR": str(tmp_path / "cache")}, cwd=tmp_path)
    with pytest.raises(LoadError, match="store could not be reached") as caught:
        fetch_weights(settings, Unreachable(), record(weights))
    assert caught.value.cause == "store"
