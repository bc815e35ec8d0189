"""Write the bundled demo checkpoint: checkpoints/demo (visuomotor_chunk).

    python scripts/make_demo_checkpoint.py [--out checkpoints/demo] [--seed 0]

The weights are a seeded initialisation, not a trained policy: the demo shows
the serving path end to end (decode, batch, forward, unnormalise), and its
actions are deterministic for a given input but mean nothing on a robot.
Normalisation statistics are set to plausible joint-space values so the
unnormalised output is in a robot-like range.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from serve_app.policies.visuomotor_chunk import VisuomotorChunkConfig, VisuomotorChunkNet, save

REPO_ROOT = Path(__file__).resolve().parent.parent


def make_demo(out: Path, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    config = VisuomotorChunkConfig(**overrides)
    net = VisuomotorChunkNet(config)
    with torch.no_grad():
        net.state_std.fill_(0.5)
        net.action_std.fill_(0.1)
    save(
        net,
        out,
        server={"port": 50051, "max_workers": 4},
        notes=f"seeded initialisation (seed {seed}) made by scripts/make_demo_checkpoint.py; not trained",
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "checkpoints" / "demo")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_demo(args.out, args.seed))


if __name__ == "__main__":
    main()
