"""python -m sim.train: expert demonstrations -> behaviour cloning -> checkpoints/demo.

    python -m sim.train [--out checkpoints/demo] [--episodes 1500] [--steps 1200] [--seed 0]

One command reproduces the bundled demo checkpoint: it records the scripted
expert on Reacher-v5 (sim/demos.py), trains the native `visuomotor_chunk`
policy on CPU to regress the expert's next 16 torques from two camera frames
and the joint state (no target), writes a servable checkpoint, and checks it
on seeded closed-loop episodes in simulation. Seeded: the same command gives
the same data; the weights match up to CPU floating-point nondeterminism.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from serve_app.policies.visuomotor_chunk import VisuomotorChunkConfig, VisuomotorChunkNet, save
from serve_app.policies.visuomotor_chunk.modeling import prompt_word_ids
from sim.demos import CHUNK, Dataset, make_dataset
from sim.scene import ACTION_DIM, STATE_DIM

REPO_ROOT = Path(__file__).resolve().parent.parent
PROMPT = "reach the red ball"
# The demo checkpoint's spec (2 cameras, 96x96, state 32, action 8, chunk 16); a lighter
# last conv layer than the default keeps training inside a few CPU minutes.
ARCHITECTURE = {"conv_channels": (16, 32, 32, 32), "hidden_dim": 256}


def log(message: str) -> None:
    print(message, flush=True)


def fit_normalisation(net: VisuomotorChunkNet, data: Dataset) -> None:
    """Per-dimension mean/std of state and actions; padded dimensions keep (0, 1)."""
    with torch.no_grad():
        net.state_mean[:STATE_DIM] = torch.from_numpy(data.state.mean(0))
        net.state_std[:STATE_DIM] = torch.from_numpy(np.maximum(data.state.std(0), 1e-2))
        flat = data.actions.reshape(-1, ACTION_DIM)
        net.action_mean[:ACTION_DIM] = torch.from_numpy(flat.mean(0))
        net.action_std[:ACTION_DIM] = torch.from_numpy(np.maximum(flat.std(0), 1e-3))


def padded(state: np.ndarray, width: int) -> torch.Tensor:
    out = torch.zeros(len(state), width)
    out[:, : state.shape[1]] = torch.from_numpy(state)
    return out


def train(data: Dataset, config: VisuomotorChunkConfig, steps: int, batch: int, lr: float, seed: int, log=log):
    torch.manual_seed(seed)
    net = VisuomotorChunkNet(config)
    fit_normalisation(net, data)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data))
    n_val = max(1, len(data) // 20)
    val, trn = order[:n_val], order[n_val:]
    images = torch.from_numpy(data.images)  # (N, cams, H, W, 3) uint8
    state = padded(data.state, config.max_state_dim)
    target = torch.zeros(len(data), CHUNK, config.max_action_dim)
    target[:, :, :ACTION_DIM] = torch.from_numpy(data.actions)
    ids, offsets = prompt_word_ids([PROMPT] * batch, config.prompt_buckets)
    mask = torch.ones(batch, config.num_cams, dtype=torch.bool)
    optimiser = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps, pct_start=0.05)

    def loss_on(idx) -> torch.Tensor:
        idx = torch.as_tensor(idx)
        n = len(idx)
        ids_n, off_n = prompt_word_ids([PROMPT] * n, config.prompt_buckets) if n != batch else (ids, offsets)
        predicted = net(images[idx], mask[:1].expand(n, -1), state[idx], ids_n, off_n)  # (n, T, A) normalised
        return torch.nn.functional.mse_loss(predicted[..., :ACTION_DIM], net.normalize_actions(target[idx])[..., :ACTION_DIM])

    started = time.monotonic()
    net.train()
    for step in range(1, steps + 1):
        loss = loss_on(trn[rng.integers(0, len(trn), batch)])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if log and (step % 200 == 0 or step == steps):
            net.eval()
            with torch.no_grad():
                val_loss = float(np.mean([loss_on(val[i : i + 256]).item() for i in range(0, len(val), 256)]))
            net.train()
            log(f"  step {step}/{steps}: train {loss.item():.4f}  val {val_loss:.4f}  ({time.monotonic() - started:.0f} s)")
    return net.eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sim.train", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "checkpoints" / "demo")
    parser.add_argument("--episodes", type=int, default=1500, help="expert demonstrations to record")
    parser.add_argument("--steps", type=int, default=1200, help="optimiser steps")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--eval_episodes", type=int, default=20, help="closed-loop check in simulation after training")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.monotonic()
    log(f"recording {args.episodes} expert demonstrations ...")
    data = make_dataset(args.episodes, seed=args.seed, log=log)
    t_data = time.monotonic() - t0
    log(f"dataset: {len(data)} samples ({data.images.nbytes / 2**20:.0f} MiB of frames) in {t_data:.0f} s")
    config = VisuomotorChunkConfig(**ARCHITECTURE)
    log(f"training visuomotor_chunk for {args.steps} steps of {args.batch} on {torch.get_num_threads()} CPU threads ...")
    t1 = time.monotonic()
    net = train(data, config, args.steps, args.batch, args.lr, args.seed)
    t_train = time.monotonic() - t1
    save(
        net,
        args.out,
        server={"port": 50051, "max_workers": 4},
        notes=(
            f"behaviour cloning of the scripted Reacher-v5 expert (sim/); python -m sim.train --episodes {args.episodes} "
            f"--steps {args.steps} --batch {args.batch} --seed {args.seed}; prompt {PROMPT!r}"
        ),
    )
    size = (args.out / "model.safetensors").stat().st_size
    log(f"wrote {args.out} ({size / 2**20:.1f} MiB); data {t_data:.0f} s + training {t_train:.0f} s = {t_data + t_train:.0f} s")
    if args.eval_episodes:
        from sim.agents import CheckpointAgent, run_sim_episodes

        result = run_sim_episodes(CheckpointAgent(args.out), range(20_000, 20_000 + args.eval_episodes))  # unseen seeds
        log(f"closed loop in simulation (no network, chunk executed whole): {result}")


if __name__ == "__main__":
    main()
