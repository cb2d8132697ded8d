"""Demo networks and the code that saves them in every format the server loads.

Nothing here is downloaded: the weights are random, seeded, and built on the spot.
The factories are valid ``NEXUS_MODEL_FACTORY`` values for ``state_dict`` and
``safetensors`` weights, and they live in the installed package so that a container
image can serve the demo without the repository's ``scripts/``:

- ``model_server.demo:build_model``: the tiny classifier, 8 features in, 2 scores out
- ``model_server.demo:build_mlp``: an MLP of about 285 MB of fp32 weights (1024 in,
  four 4096x4096 hidden layers, 16 out), for benchmarks
- ``model_server.demo:build_small_mlp``: the same shape at width 512, for smoke runs
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

FORMATS = ("torchscript", "torch_export", "state_dict", "safetensors")
EXTENSIONS = {
    "torchscript": ".pt",
    "torch_export": ".pt2",
    "state_dict": ".pt",
    "safetensors": ".safetensors",
}


class TinyClassifier(torch.nn.Module):
    """The demo model: 8 features in, 2 scores out."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MLP(torch.nn.Module):
    """``inputs`` -> ``depth`` hidden layers of ``width`` -> ``outputs``, with ReLUs."""

    def __init__(self, inputs: int, width: int, depth: int, outputs: int) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = [torch.nn.Linear(inputs, width), torch.nn.ReLU()]
        for _ in range(depth):
            layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
        layers.append(torch.nn.Linear(width, outputs))
        self.layers = torch.nn.Sequential(*layers)
        self.input_features = inputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def build_model() -> torch.nn.Module:
    """Factory for the tiny classifier's ``state_dict``/``safetensors`` weights."""
    return TinyClassifier()


def build_mlp() -> torch.nn.Module:
    """Factory for the benchmark MLP (about 285 MB of fp32 weights)."""
    return MLP(1024, 4096, 4, 16)


def build_small_mlp() -> torch.nn.Module:
    """Factory for the benchmark MLP's smoke-run size (about 5 MB)."""
    return MLP(1024, 512, 4, 16)


def input_features(model: torch.nn.Module) -> int:
    return getattr(model, "input_features", 8)


def save(model: torch.nn.Module, path: Path, fmt: str) -> Path:
    """Write ``model`` to ``path`` as ``fmt`` (one of ``FORMATS``); returns ``path``."""
    model = model.eval()
    example = torch.zeros(2, input_features(model))
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's deprecation notices
            torch.jit.save(torch.jit.trace(model, example), str(path))
    elif fmt == "torch_export":
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        torch.export.save(program, str(path))
    elif fmt == "state_dict":
        torch.save(model.state_dict(), path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return path
