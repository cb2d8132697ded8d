"""Write a demo model (8 features in, 2 scores out) in any format the model server loads.

    python scripts/demo_model.py OUT.pt --seed 1                      # TorchScript
    python scripts/demo_model.py OUT.pt2 --seed 1 --format torch_export
    python scripts/demo_model.py OUT.pt --format state_dict           # + a factory, below
    python scripts/demo_model.py OUT.safetensors --format safetensors # + a factory, below
    python scripts/demo_model.py big.pt --format state_dict --size big

state_dict and safetensors weights are served with NEXUS_MODEL_FACTORY set to
model_server.demo:build_model (tiny), build_small_mlp (small) or build_mlp (big: about
285 MB of fp32 weights, 1024 features in, 16 out).

Different seeds give different weights, so two "training runs" give two versions. The
networks and their factories live in ``model_server/demo.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from model_server.demo import FORMATS, build_mlp, build_model, build_small_mlp, save

BUILDERS = {"tiny": build_model, "small": build_small_mlp, "big": build_mlp}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=FORMATS, default="torchscript")
    parser.add_argument(
        "--size",
        choices=sorted(BUILDERS),
        default="tiny",
        help="tiny: 8->2 classifier; small: ~5 MB MLP; big: ~285 MB MLP (1024 features in)",
    )
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    save(BUILDERS[args.size](), args.output, args.format)


if __name__ == "__main__":
    main()
