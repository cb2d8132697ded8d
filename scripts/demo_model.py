"""Write a small TorchScript model (8 features in, 2 scores out) for the demo.

    python scripts/demo_model.py OUT.pt --seed 1

Different seeds give different weights, so two "training runs" give two versions.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch


class TinyClassifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = TinyClassifier().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.save's deprecation notice
        traced = torch.jit.trace(model, torch.zeros(1, 8))
        args.output.parent.mkdir(parents=True, exist_ok=True)
        torch.jit.save(traced, str(args.output))


if __name__ == "__main__":
    main()
