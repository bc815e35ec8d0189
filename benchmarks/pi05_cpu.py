"""pi05 on this CPU, side by side in one run: ours, ours before the speed work, and OpenTau 0.14.0's own.

    python -m benchmarks.pi05_cpu                    # writes benchmarks/results/pi05_cpu.json
    python -m benchmarks.pi05_cpu --quick --out F    # ours alone at a tiny size (tests/test_pi05_speed.py)

One checkpoint for all: OpenTau's own code builds and seeds a pi05 at a
quarter of its widths and its full depths (SigLIP 27 layers, Gemma 18 + 18),
224x224, 2 cameras, chunk 50, 10 steps, float32, and saves it; serve_app
loads that file. Sides:
    ours     this tree
    before   this repository at BEFORE_COMMIT, from a git worktree (PYTHONPATH)
    opentau  opentau.policies.pi05 in OpenTau's own venv
Each side is a worker process blocked on a pipe while another computes, all
with the same torch thread count; rounds run every side once in a rotating
order, so drift on a shared machine spreads over all of them.

Measured per side: latency of one batch-1 chunk (median over rounds), the
aten:: events torch.profiler records in one predict, and the chunk itself
(ours against OpenTau's). Targets: ours <= 0.8 x OpenTau's latency, and
<= 1/3 of before's aten events.

Exit status: 0 targets met, 1 missed, 2 OpenTau's environment is absent.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from testbed.opentau_env import DEFAULT_VENV, opentau_python

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "benchmarks" / "results" / "pi05_cpu.json"
BEFORE_COMMIT = "4e6fb0b"
LATENCY_TARGET = 0.8  # ours / OpenTau
EVENTS_TARGET = 1 / 3  # ours / before
PROMPT = "pick up the red cube and put it in the bin"
DELAY = 2  # real-time chunking: two rows pinned to the previous chunk, as a robot serving at 50 Hz would

# pi05 is PaliGemma-3B (SigLIP so400m/14 + Gemma 2B) and a Gemma-300M action expert. At a quarter of
# every width and all of its depths one chunk takes seconds on two cores, so all sides fit one run.
QUARTER_WIDTH = {
    "paligemma_config": {
        "projection_dim": 512,
        "text_config": {"hidden_size": 512, "intermediate_size": 4096, "num_hidden_layers": 18,
                        "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 64, "vocab_size": 1024},
        "vision_config": {"hidden_size": 288, "intermediate_size": 1076, "num_hidden_layers": 27,
                          "num_attention_heads": 16, "patch_size": 14, "image_size": 224},
    },
    "gemma_expert_config": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 18,
                            "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 64, "vocab_size": 1024},
}


def _tiny_module():
    spec = importlib.util.spec_from_file_location("pi05_tiny", REPO_ROOT / "scripts" / "pi05_make_tiny_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def benchmark_train_config(tiny) -> dict:
    """OpenTau's pi05 defaults (32-dim state/action, chunk 50, prompts padded to 256) at QUARTER_WIDTH."""
    config = tiny.tiny_train_config(num_cams=2, state_dim=32, action_dim=32, max_dim=32, chunk=50, max_delay=5)
    res = QUARTER_WIDTH["paligemma_config"]["vision_config"]["image_size"]
    config["resolution"] = [res, res]
    policy = config["policy"]
    policy.update(QUARTER_WIDTH, prompt_max_length=256, resize_imgs_with_padding=[res, res],
                  proj_width=QUARTER_WIDTH["gemma_expert_config"]["hidden_size"])
    for name, feature in policy["input_features"].items():
        if feature["type"] == "VISUAL":
            feature["shape"] = [3, res, res]
    return config


def write_inputs(work: Path, train_config: dict, seed: int) -> None:
    p = train_config["policy"]
    rng = np.random.default_rng(seed)
    res, cams, chunk = train_config["resolution"][0], train_config["num_cams"], p["chunk_size"]
    np.savez(
        work / "inputs.npz",
        images=rng.integers(0, 256, (1, cams, res, res, 3), dtype=np.uint8),
        state=rng.uniform(-1.5, 1.5, (1, p["input_features"]["state"]["shape"][0])).astype(np.float32),
        prefix=rng.normal(0, 1, (1, chunk, p["output_features"]["actions"]["shape"][0])).astype(np.float32),
        noise=rng.normal(0, 1, (1, chunk, p["max_action_dim"])).astype(np.float32),
        delay=np.array([DELAY], dtype=np.int64),
    )
    (work / "spec.json").write_text(json.dumps({"train_config": train_config, "prompts": [PROMPT], "seed": seed}))


class Worker:
    """A side's process: one JSON command per line in, one JSON answer per line out."""

    def __init__(self, name: str, argv: list[str], env: dict, log: Path, ready_timeout: float):
        self.name, self.log = name, log
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("w"),
                                     text=True, env=env, cwd="/")
        self._read(ready_timeout)

    def ask(self, timeout: float = 1800, **command) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def _read(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            tail = self.log.read_text()[-4000:] if self.log.exists() else ""
            self.close()
            raise RuntimeError(f"{self.name} worker gave no answer within {timeout:.0f} s; its log {self.log}:\n{tail}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()


def worker_env(threads: int, pythonpath: str) -> dict:
    return {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def serve_app_worker(name: str, tree: Path, work: Path, threads: int) -> Worker:
    argv = [sys.executable, str(REPO_ROOT / "benchmarks" / "pi05_serve_app_worker.py"), str(work), str(threads)]
    return Worker(name, argv, worker_env(threads, str(tree)), work / f"{name}.log", ready_timeout=900)


def before_tree(path: Path, commit: str) -> Path:
    """A git worktree of this repository at `commit` (made when missing)."""
    if not path.exists():
        subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "add", "--detach", str(path), commit], check=True,
                       capture_output=True)
    head = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    if not head.stdout.strip().startswith(commit):
        raise SystemExit(f"{path} is at {head.stdout.strip()[:12]}, not {commit}: remove it or pass --before-tree")
    return path


def measure(workers: dict[str, Worker], rounds: int, work: Path) -> dict:
    sides = {}
    for name, w in workers.items():  # also the warm-up call
        w.ask(op="save", path=str(work / f"chunk_{name}.npy"))
        sides[name] = {"info": w.ask(op="info")}  # the prefix length is known after a predict
    for name, w in workers.items():
        sides[name]["aten_events_per_predict"] = w.ask(op="count")["aten_events"]
    order = list(workers)
    samples: dict[str, list[float]] = {name: [] for name in order}
    for r in range(rounds):
        for name in order[r % len(order):] + order[: r % len(order)]:
            samples[name].append(workers[name].ask(op="predict")["seconds"])
    for name in order:
        sides[name]["latency_s"] = {"median": statistics.median(samples[name]), "min": min(samples[name]),
                                    "samples": [round(s, 4) for s in samples[name]]}
    return sides


def run(args) -> int:
    python = None if args.quick else opentau_python(args.opentau_venv)
    if not args.quick and python is None:
        print(f"pi05_cpu: NOT RUN: no OpenTau environment at {args.opentau_venv} (needs bin/python with opentau "
              "0.14.0 and sentencepiece; see docs/pi05.md), so there is nothing to compare against. "
              "--quick runs our side alone.", file=sys.stderr)
        return 2
    tiny = _tiny_module()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="pi05-cpu-"))
    (work / "ckpt").mkdir(parents=True, exist_ok=True)
    threads = args.threads
    tiny.train_tokenizer(work / "ckpt" / "tokenizer.model")
    workers: dict[str, Worker] = {}
    try:
        if args.quick:  # ours alone, a tiny checkpoint of our own (seeded, no OpenTau)
            tiny.make_tiny(work / "ckpt", seed=args.seed)
            train_config = json.loads((work / "ckpt" / "train_config.json").read_text())
            write_inputs(work, train_config, args.seed)
            workers["ours"] = serve_app_worker("ours", REPO_ROOT, work, threads)
        else:
            train_config = benchmark_train_config(tiny)
            write_inputs(work, train_config, args.seed)
            argv = [str(python), str(REPO_ROOT / "benchmarks" / "pi05_opentau_worker.py"), str(work), str(threads)]
            started = time.perf_counter()
            workers["opentau"] = Worker("opentau", argv, worker_env(threads, ""), work / "opentau.log", 1800)
            print(f"OpenTau built and saved the checkpoint in {time.perf_counter() - started:.0f} s: {work / 'ckpt'}")
            workers["ours"] = serve_app_worker("ours", REPO_ROOT, work, threads)
            workers["before"] = serve_app_worker("before", before_tree(args.before_tree, BEFORE_COMMIT), work, threads)
        sides = measure(workers, args.rounds, work)
    finally:
        for w in workers.values():
            w.close()

    report = {
        "benchmark": "pi05 on the CPU: one batch-1 action chunk, side by side in one run",
        "command": " ".join(["python -m benchmarks.pi05_cpu", *sys.argv[1:]]),
        "config": config_summary(train_config, quick=args.quick),
        "torch_threads": threads,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "rounds": args.rounds,
        "sides": sides,
        "cpu_path": "eager; torch.compile and CUDA graphs are CUDA-only (serve_app/policies/pi05/static_shapes.py)",
    }
    ok = True
    if not args.quick:
        chunks = {name: np.load(work / f"chunk_{name}.npy") for name in sides}
        lat = {name: s["latency_s"]["median"] for name, s in sides.items()}
        events = {name: s["aten_events_per_predict"] for name, s in sides.items()}
        report["ratios"] = {
            "latency_ours_over_opentau": lat["ours"] / lat["opentau"],
            "latency_ours_over_before": lat["ours"] / lat["before"],
            "aten_events_ours_over_before": events["ours"] / events["before"],
        }
        report["chunks_max_abs_diff"] = {
            "ours_vs_opentau": float(np.abs(chunks["ours"] - chunks["opentau"]).max()),
            "before_vs_opentau": float(np.abs(chunks["before"] - chunks["opentau"]).max()),
            "ours_vs_before": float(np.abs(chunks["ours"] - chunks["before"]).max()),
            "max_abs_action": float(np.abs(chunks["opentau"]).max()),
        }
        report["targets"] = {
            "latency_ours_over_opentau_at_most": LATENCY_TARGET,
            "aten_events_ours_over_before_at_most": EVENTS_TARGET,
        }
        ok = (report["ratios"]["latency_ours_over_opentau"] <= LATENCY_TARGET
              and report["ratios"]["aten_events_ours_over_before"] <= EVENTS_TARGET)
        report["targets_met"] = ok
    out = args.out or (None if args.quick else RESULTS)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("ratios", "chunks_max_abs_diff") if k in report}, indent=2))
    for name, s in sides.items():
        print(f"{name:8s} median {s['latency_s']['median']:.3f} s  aten events {s['aten_events_per_predict']}  "
              f"prefix tokens {s['info'].get('prefix_tokens')}")
    if out:
        print(f"wrote {out}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


def config_summary(train_config: dict, quick: bool) -> dict:
    p = train_config["policy"]
    return {
        "size": "tiny (--quick)" if quick else "a quarter of pi05's widths, full depths",
        "paligemma_config": p["paligemma_config"],
        "gemma_expert_config": p["gemma_expert_config"],
        "image": train_config["resolution"],
        "cameras": train_config["num_cams"],
        "chunk": p["chunk_size"],
        "num_steps": p["num_steps"],
        "state_type": p["state_type"],
        "state_dim": p["input_features"]["state"]["shape"][0],
        "action_dim": p["output_features"]["actions"]["shape"][0],
        "prompt_max_length": p["prompt_max_length"],
        "prompt": PROMPT,
        "delay": DELAY,
        "batch": 1,
        "dtype": "float32",
    }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="ours alone at a tiny size (no OpenTau, no before tree)")
    ap.add_argument("--rounds", type=int, default=None, help="timed predicts per side (default 5; 2 with --quick)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of every side (default: this machine's)")
    ap.add_argument("--opentau-venv", type=Path, default=DEFAULT_VENV)
    ap.add_argument("--before-tree", type=Path, default=Path("/tmp/pi05-before"),
                    help=f"a git worktree at {BEFORE_COMMIT} (made when missing)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the checkpoint, chunks and worker logs here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help=f"JSON report (default {RESULTS.relative_to(REPO_ROOT)}; "
                    "--quick writes only when given)")
    return ap


def main() -> int:
    args = parser().parse_args()
    if args.rounds is None:
        args.rounds = 2 if args.quick else 5
    if args.threads is None:
        import torch

        args.threads = torch.get_num_threads()
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
