"""Format detection on files made by the real libraries, and on files that only look alike."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nexus_cli.formats import detect_format


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("formats")
    model = Tiny().eval()
    example = torch.randn(3, 4)
    names = ("ts.pt", "sd.pt", "whole.pt", "ep.pt2", "w.safetensors", "plain.pkl", "other.zip")
    made = {name: folder / name for name in names}
    torch.jit.save(torch.jit.trace(model, example), made["ts.pt"])
    torch.save(model.state_dict(), made["sd.pt"])
    torch.save(model, made["whole.pt"])
    torch.export.save(torch.export.export(model, (example,)), made["ep.pt2"])
    save_file(model.state_dict(), made["w.safetensors"])
    made["plain.pkl"].write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with zipfile.ZipFile(made["other.zip"], "w") as archive:
        archive.writestr("readme.txt", "hello")
    return made


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ts.pt", "torchscript"),
        ("sd.pt", "state_dict"),
        ("ep.pt2", "torch_export"),
        ("w.safetensors", "safetensors"),
        ("whole.pt", "unknown"),  # a pickled whole module is not a state dict
        ("plain.pkl", "unknown"),
        ("other.zip", "unknown"),
    ],
)
def test_detect_format(files: dict[str, Path], name: str, expected: str) -> None:
    assert detect_format(files[name]) == expected


@pytest.mark.parametrize(
    "data",
    [b"", b"PK\x03\x04not really a zip", b"\x10\x00\x00\x00\x00\x00\x00\x00{broken json}...",
     b"\xff" * 64, b"hello world, just text\n"],
)  # fmt: skip
def test_odd_bytes_are_unknown(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert detect_format(path) == "unknown"
