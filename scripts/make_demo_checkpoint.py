"""Write an untrained, seeded visuomotor_chunk checkpoint (for tests and load experiments).

    python scripts/make_demo_checkpoint.py --out DIR [--seed 0]

The bundled checkpoints/demo is the *trained* policy (`python -m sim.train`);
this writes a checkpoint with the same spec whose weights are a seeded
initialisation: deterministic actions that mean nothing on a robot, e.g. to
redeploy "a different checkpoint" in fault tests.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from serve_app.policies.visuomotor_chunk import VisuomotorChunkConfig, VisuomotorChunkNet, save



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
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_demo(args.out, args.seed))


if __name__ == "__main__":
    main()
