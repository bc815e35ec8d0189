"""Host memory of loading a pi05 checkpoint: the streaming loader against the one before it (4e6fb0b).

    python -m benchmarks.pi05_load [--full]   # writes benchmarks/results/pi05_load.json

A random mid-size pi05 (every width a quarter of the real one, full depth and
vocabulary: the 257152 x 512 embedding alone is 43% of it) is written in the
layout of an OpenTau checkpoint, bf16 on disk. Each loader then runs in a
fresh process that, after verify_checkpoint() as the app does, reports its
peak resident set during load() (VmHWM, reset just before) over what it held
then, as a multiple of the bytes the network occupies once loaded in bf16.
The old loader can only load fp32 on the CPU; the new one is measured both ways.

The checkpoint writer here also serves benchmarks/pi05_gpu.py: it generates
each tensor on any device and streams it to the file, so a full-size
checkpoint never exists in host memory as a whole.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "benchmarks" / "results" / "pi05_load.json"
BEFORE_COMMIT = "4e6fb0b"
BEFORE_TREE = Path("/tmp/pi05-before")
TARGET_RATIO = 1.3  # peak host memory of a bf16 load / the bf16 weights' bytes
TABLES = ("lm_head", "position_embedding", "discrete_action_embedding", "modality_embedding")
SAFETENSORS_DTYPES = {"torch.float32": "F32", "torch.bfloat16": "BF16", "torch.float16": "F16"}


# --- a random pi05 checkpoint ------------------------------------------------------


def scaled_arch(divisor: int) -> dict:
    """`policy.paligemma_config` / `gemma_expert_config` with every width of the real pi05 / divisor."""
    from serve_app.policies.pi05.configuration import EXPERT_DEFAULT, GemmaConfig, VisionConfig

    vision, language, expert = VisionConfig(), GemmaConfig(), EXPERT_DEFAULT
    gemma = lambda g: {
        "hidden_size": g.hidden_size // divisor,
        "intermediate_size": g.intermediate_size // divisor,
        "head_dim": g.head_dim // divisor,
    }
    return {
        "paligemma_config": {
            "projection_dim": language.hidden_size // divisor,
            "text_config": gemma(language),
            "vision_config": {
                "hidden_size": vision.hidden_size // divisor,
                "intermediate_size": vision.intermediate_size // divisor,
            },
        },
        "gemma_expert_config": gemma(expert),
    }


def bench_train_config(arch: dict | None, num_cams: int = 2, state_dim: int = 32, action_dim: int = 32) -> dict:
    """OpenTau's train_config.json for a pi05 of `arch` (None: the full size), 2 cameras at the tower's size."""
    tiny = tiny_script()
    config = tiny.tiny_train_config(
        num_cams=num_cams, state_dim=state_dim, action_dim=action_dim, max_dim=32, chunk=50, max_delay=5
    )
    policy = config["policy"]
    for key in ("paligemma_config", "gemma_expert_config", "discrete_action_vocab_size", "prompt_max_length"):
        policy.pop(key)  # back to Pi05Config's defaults (the real pi05), then `arch` on top
    policy.update(arch or {})
    vision = ((arch or {}).get("paligemma_config") or {}).get("vision_config") or {}
    res = vision.get("image_size", 224)
    expert_width = ((arch or {}).get("gemma_expert_config") or {}).get("hidden_size", 1024)
    config["resolution"] = [res, res]
    policy.update(resize_imgs_with_padding=[res, res], proj_width=expert_width)
    for i in range(num_cams):
        policy["input_features"][f"camera{i}"]["shape"] = [3, res, res]
    config["notes"] = "random pi05 from benchmarks/pi05_load.py; not trained"
    return config


def write_random_checkpoint(out: Path, arch: dict | None, device="cpu", seed: int = 0) -> Path:
    """train_config.json, tokenizer.model and model.safetensors of a random pi05, tensors made on `device`.

    On disk as OpenTau stores it: bf16, except the normalisation statistics
    and SigLIP's patch/position embeddings (float32).
    """
    import torch

    from serve_app.checkpoint import open_checkpoint
    from serve_app.policies.pi05 import Pi05Config, Pi05Network
    from serve_app.policies.pi05.policy import serving_dtype

    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(bench_train_config(arch), indent=2) + "\n")
    tiny_script().train_tokenizer(out / "tokenizer.model")
    (out / "model.safetensors").touch()  # open_checkpoint wants the file; written below
    with torch.device("meta"):
        net = Pi05Network(Pi05Config.from_checkpoint(open_checkpoint(out)))
    layout = {name: (tuple(t.shape), serving_dtype(name, torch.bfloat16)) for name, t in net.state_dict().items()}
    generator = torch.Generator(device=device).manual_seed(seed)
    make = lambda name, shape, dtype: _random_weight(name, shape, dtype, generator, device)
    write_safetensors(out / "model.safetensors", layout, make)
    return out


def write_safetensors(path: Path, layout: dict, make) -> None:
    """A safetensors file of `layout` {name: (shape, dtype)}, each tensor from make(name, shape, dtype) in turn."""
    import torch

    header, offset = {}, 0
    for name, (shape, dtype) in sorted(layout.items()):
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        entry = {"dtype": SAFETENSORS_DTYPES[str(dtype)], "shape": list(shape), "data_offsets": [offset, offset + size]}
        header[name] = entry
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, (shape, dtype) in sorted(layout.items()):
            tensor = make(name, shape, dtype).to("cpu").contiguous()
            f.write(tensor.reshape(-1).view(torch.uint8).numpy())


def _random_weight(name: str, shape, dtype, generator, device):
    """Plausible scales: unit-variance activations through every layer, joint-space statistics."""
    import torch

    if not name.startswith("model."):  # statistics: means in +-0.5, std / range 0.2-1
        r = torch.rand(shape, generator=generator, device=device, dtype=dtype)
        if name.endswith((".min", ".q01")):
            return r - 1.5
        if name.endswith((".max", ".q99")):
            return r + 0.5
        return r - 0.5 if name.endswith(".mean") else r * 0.8 + 0.2
    mean, std = 0.0, 0.3  # biases
    if "norm" in name and name.endswith(".weight") and len(shape) == 1:
        mean, std = (1.0 if "vision_tower" in name else 0.0), 0.1  # LayerNorm's scale, Gemma's (1 + w)
    elif any(table in name for table in TABLES):
        std = 0.5
    elif len(shape) > 1:
        std = 1.0 / math.prod(shape[1:]) ** 0.5  # fan-in
    return torch.randn(shape, generator=generator, device=device, dtype=dtype).mul_(std).add_(mean)


def tiny_script():
    """scripts/pi05_make_tiny_checkpoint.py: its train_config layout and its tokenizer trainer."""
    spec = importlib.util.spec_from_file_location("pi05_tiny", REPO_ROOT / "scripts" / "pi05_make_tiny_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- host memory ---------------------------------------------------------------


class HostPeak:
    """Peak resident set of this process over a stretch of code (Linux: VmHWM, reset via clear_refs)."""

    def start(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (and ru_maxrss) to the current RSS
            self.reset = True
        except OSError:
            self.reset = False  # then the peak may predate start(): an upper bound
        self.baseline = _status_kib("VmRSS") * 1024

    def growth(self) -> dict:
        hwm = _status_kib("VmHWM") * 1024
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {
            "baseline_bytes": self.baseline,
            "vmhwm_growth_bytes": hwm - self.baseline,
            "ru_maxrss_growth_bytes": maxrss - self.baseline,
            "peak_was_reset": self.reset,
        }


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


# --- one load, in a fresh process -----------------------------------------------


def child(tree: Path, ckpt: Path, dtype: str) -> dict:
    """Load `ckpt` on the CPU with the loader of the source tree `tree`; what it cost."""
    sys.path.insert(0, str(tree))
    import torch

    from serve_app.checkpoint import open_checkpoint
    from serve_app.policies import verify_checkpoint
    from serve_app.policies.pi05 import load

    checkpoint = open_checkpoint(ckpt)
    verify_checkpoint(checkpoint)  # as the app does first; also torch's one-off meta-device imports (~80 MB)
    kwargs = {} if dtype == "default" else {"dtype": getattr(torch, dtype)}
    peak = HostPeak()
    peak.start()
    began = time.perf_counter()
    policy = load(checkpoint, "cpu", **kwargs)
    seconds = time.perf_counter() - began
    tensors = policy.net.state_dict().values()
    counts: dict[str, int] = {}
    for t in tensors:
        counts[str(t.dtype).removeprefix("torch.")] = counts.get(str(t.dtype).removeprefix("torch."), 0) + t.numel()
    return {**peak.growth(), "load_s": round(seconds, 2), "model_bytes": sum(t.nbytes for t in tensors),
            "elements_by_dtype": counts}


def run_child(tree: Path, ckpt: Path, dtype: str) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(tree), str(ckpt), dtype]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(command, cwd=tree, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"load in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def before_tree() -> Path:
    """The worktree of 4e6fb0b (the loader before streaming), made if absent; another engineer may share it."""
    if not (BEFORE_TREE / ".git").exists():
        made = subprocess.run(["git", "worktree", "add", str(BEFORE_TREE), BEFORE_COMMIT], cwd=REPO_ROOT,
                              capture_output=True, text=True)
        if made.returncode and not (BEFORE_TREE / ".git").exists():
            raise RuntimeError(f"git worktree add {BEFORE_TREE} {BEFORE_COMMIT}: {made.stderr}")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=BEFORE_TREE, capture_output=True, text=True).stdout
    if not head.startswith(BEFORE_COMMIT):
        raise RuntimeError(f"{BEFORE_TREE} is at {head.strip()}, not {BEFORE_COMMIT}")
    return BEFORE_TREE


def measure(divisor: int = 4, workdir: Path | None = None, full: bool = False) -> dict:
    workdir = Path(workdir or tempfile.mkdtemp(prefix="pi05-load-"))
    began = time.perf_counter()
    ckpt = write_random_checkpoint(workdir / "ckpt", scaled_arch(divisor))
    written_s = time.perf_counter() - began
    runs = {
        "new_bf16": run_child(REPO_ROOT, ckpt, "bfloat16"),
        "new_fp32": run_child(REPO_ROOT, ckpt, "default"),
        "before_fp32": run_child(before_tree(), ckpt, "default"),
    }
    bf16_bytes = runs["new_bf16"]["model_bytes"]
    for run in runs.values():
        run["peak_over_bf16_weights"] = round(run["vmhwm_growth_bytes"] / bf16_bytes, 3)
    ratio = runs["new_bf16"]["peak_over_bf16_weights"]
    report = {
        "checkpoint": {
            "widths": f"pi05 / {divisor} (full depth and vocabulary)",
            "parameters": sum(runs["new_bf16"]["elements_by_dtype"].values()),
            "file_bytes": (ckpt / "model.safetensors").stat().st_size,
            "on_disk": "bf16; statistics and SigLIP patch/position embeddings float32",
            "written_s": round(written_s, 1),
        },
        "bf16_weight_bytes": bf16_bytes,
        "measure": (
            "in a fresh process, after verify_checkpoint() as the app runs it: peak RSS during load() "
            "(VmHWM, reset just before) minus RSS just before, / bf16_weight_bytes"
        ),
        "loads": {
            "new_bf16": {"loader": "streaming (this tree)", "dtype": "bf16 on CPU", **runs["new_bf16"]},
            "new_fp32": {"loader": "streaming (this tree)", "dtype": "fp32 on CPU (default)", **runs["new_fp32"]},
            "before_fp32": {"loader": f"load_file + .float() ({BEFORE_COMMIT})", "dtype": "fp32 on CPU",
                            **runs["before_fp32"]},
        },
        "target": {"new_bf16_peak_over_bf16_weights_max": TARGET_RATIO, "pass": ratio <= TARGET_RATIO},
    }
    if full:  # the real size, bf16 only: 6.7 GB in the child (fp32 loads would need 13-20 GB)
        shutil.rmtree(ckpt)
        ckpt = write_random_checkpoint(workdir / "full", None)
        run = run_child(REPO_ROOT, ckpt, "bfloat16")
        run["peak_over_bf16_weights"] = round(run["vmhwm_growth_bytes"] / run["model_bytes"], 3)
        report["full_size_new_bf16"] = {"file_bytes": (ckpt / "model.safetensors").stat().st_size, **run}
        report["target"]["full_size_pass"] = run["peak_over_bf16_weights"] <= TARGET_RATIO
    return report


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        print(json.dumps(child(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--divisor", type=int, default=4, help="every width of the real pi05 divided by this")
    parser.add_argument("--full", action="store_true", help="also the full size, new loader in bf16 (6.7 GB)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pi05-load-") as work:
        report = measure(args.divisor, Path(work), args.full)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    loads = report["loads"]
    print(", ".join(f"{k}: {v['peak_over_bf16_weights']}x in {v['load_s']} s" for k, v in loads.items()))
    if "full_size_new_bf16" in report:
        print(f"full size, new bf16: {report['full_size_new_bf16']['peak_over_bf16_weights']}x")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
