"""Parity of serve_app's pi05 with OpenTau 0.14.0's own implementation (opt-in).

    python scripts/pi05_parity.py [--venv /work/opentau-venv] [--workdir DIR]

1. In OpenTau's virtual environment (Python 3.10, `uv pip install opentau==0.14.0
   sentencepiece`), OpenTau's own code builds a tiny pi05 (its network sizes
   patched down, its parameters seeded), saves it with `save_pretrained`, and
   samples action chunks for fixed images, states, prompts, RTC prefixes and
   noise, in fp32 and with the network in bf16 (SigLIP embeddings fp32) as OpenTau serves it.
2. This process loads that checkpoint with serve_app's pi05 and samples the
   same chunks from the same inputs and noise.
3. It prints the max abs difference (fp32) and the max abs difference relative to
   the chunk's max magnitude (bf16). Targets: fp32 <= 1e-5, bf16 <= 2e-2.

OpenTau would fetch its tokenizer (google/paligemma-3b-pt-224) and the FAST
action tokenizer from the Hugging Face hub; the worker below hands it a local
tokenizer.model instead and a stand-in for FAST (whose only effect at inference
is the size of two training-only heads). That patching happens here, in the
worker, never in the serving path.

Exits 0 with "skipped: ..." when OpenTau's environment is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "scripts"))

FP32_TARGET = 1e-5
BF16_TARGET = 2e-2
BATCH = 3
DELAYS = [0, 1, 2]

WORKER = textwrap.dedent(
    '''
    """Runs inside OpenTau's venv: build, save and sample a tiny pi05 with OpenTau's own code."""
    import json, os, sys
    import numpy as np
    import torch

    work = sys.argv[1]
    spec = json.load(open(os.path.join(work, "spec.json")))
    ckpt = os.path.join(work, "ckpt")
    inputs = np.load(os.path.join(work, "inputs.npz"))

    import transformers
    from transformers import GemmaTokenizerFast

    tokenizer = GemmaTokenizerFast(vocab_file=os.path.join(ckpt, "tokenizer.model"))


    class LocalFast:  # stand-in for physical-intelligence/fast: only its vocab size reaches the network
        vocab_size = spec["policy"]["discrete_action_vocab_size"]


    transformers.AutoTokenizer.from_pretrained = lambda *a, **k: tokenizer
    transformers.AutoProcessor.from_pretrained = lambda *a, **k: LocalFast()

    from transformers.models.auto import CONFIG_MAPPING
    from opentau.configs.types import FeatureType, PolicyFeature
    from opentau.policies.pi05 import modeling_pi05, paligemma_with_expert as pwe
    from opentau.policies.pi05.configuration_pi05 import PI05Config
    from opentau.policies.utils import to_dtype_preserving_siglip_float32

    modeling_pi05.AutoTokenizer.from_pretrained = transformers.AutoTokenizer.from_pretrained
    modeling_pi05.AutoProcessor.from_pretrained = transformers.AutoProcessor.from_pretrained
    modeling_pi05.PI05Policy._check_discrete_action_tokenizer_convention = lambda self, path: None

    arch = spec["policy"]
    pali, expert = arch["paligemma_config"], arch["gemma_expert_config"]
    _init = pwe.PaliGemmaWithExpertConfig.__init__


    def tiny_init(self, *args, **kwargs):  # OpenTau hard-codes PaliGemma-3B; shrink it
        _init(self, *args, **kwargs)
        text = dict(pali["text_config"], model_type="gemma", hidden_activation="gelu_pytorch_tanh",
                    use_adarms=False, adarms_cond_dim=None)
        vision = dict(pali["vision_config"], model_type="siglip_vision_model", projector_hidden_act="gelu_fast",
                      vision_use_head=False, projection_dim=pali["projection_dim"])
        self.paligemma_config = CONFIG_MAPPING["paligemma"](
            bos_token_id=2, eos_token_id=1, pad_token_id=0, hidden_size=text["hidden_size"],
            image_token_index=text["vocab_size"] - 1, projection_dim=pali["projection_dim"],
            text_config=text, vision_config=vision)
        self.gemma_expert_config = CONFIG_MAPPING["gemma"](
            **expert, hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
            use_adarms=True, adarms_cond_dim=expert["hidden_size"], pad_token_id=0)


    pwe.PaliGemmaWithExpertConfig.__init__ = tiny_init

    feats = lambda d: {k: PolicyFeature(FeatureType[v["type"]], tuple(v["shape"])) for k, v in d.items()}
    p = spec["policy"]
    config = PI05Config(
        input_features=feats(p["input_features"]), output_features=feats(p["output_features"]),
        chunk_size=p["chunk_size"], n_action_steps=p["chunk_size"], max_state_dim=p["max_state_dim"],
        max_action_dim=p["max_action_dim"], proj_width=p["proj_width"], prompt_max_length=p["prompt_max_length"],
        resize_imgs_with_padding=tuple(p["resize_imgs_with_padding"]), max_delay=p["max_delay"],
        num_steps=p["num_steps"], state_type=p["state_type"])
    g = torch.Generator().manual_seed(spec["seed"])
    sd, ad = p["input_features"]["state"]["shape"][0], p["output_features"]["actions"]["shape"][0]
    stats = [{
        "state": {"mean": torch.rand(sd, generator=g) - 0.5, "std": 0.3 + torch.rand(sd, generator=g)},
        "actions": {"mean": torch.rand(ad, generator=g) - 0.5, "std": 0.3 + torch.rand(ad, generator=g),
                    "min": -1 - torch.rand(ad, generator=g), "max": 1 + torch.rand(ad, generator=g)},
    }]
    torch.manual_seed(spec["seed"])
    policy = modeling_pi05.PI05Policy(config, per_dataset_stats=stats)
    with torch.no_grad():  # OpenTau zero-initialises the adaRMS and some norms: give every path signal
        for name, param in policy.model.named_parameters():
            scale = 0.3 if param.ndim == 1 else 1.0 / param.shape[-1] ** 0.5
            param.add_((scale * torch.randn(param.shape, generator=g)).to(param.dtype))
    policy.eval()
    policy.save_pretrained(ckpt)
    policy_section = json.load(open(os.path.join(ckpt, "config.json")))
    policy_section.update({k: arch[k] for k in ("paligemma_config", "gemma_expert_config", "discrete_action_vocab_size")})
    train_config = {"resolution": p["resize_imgs_with_padding"], "num_cams": spec["num_cams"],
                    "max_state_dim": p["max_state_dim"], "max_action_dim": p["max_action_dim"],
                    "action_chunk": p["chunk_size"], "policy": policy_section}
    json.dump(train_config, open(os.path.join(ckpt, "train_config.json"), "w"), indent=2)


    def run(dtype):
        chunks = []
        for i, delay in enumerate(spec["delays"]):
            batch = {f"camera{c}": torch.from_numpy(inputs["images"][i, c]).permute(2, 0, 1)[None].float() / 255.0
                     for c in range(spec["num_cams"])}
            state = np.zeros((1, p["max_state_dim"]), np.float32)
            state[0, :sd] = inputs["state"][i]
            batch["state"] = torch.from_numpy(state)
            batch["prompt"] = [spec["prompts"][i]]
            prefix = torch.zeros(1, p["chunk_size"], p["max_action_dim"])
            prefix[0, :, :ad] = torch.from_numpy(inputs["prefix"][i])
            noise = torch.from_numpy(inputs["noise"][i : i + 1])
            with torch.inference_mode():
                out = policy.sample_actions(batch, action_prefix=prefix, delay=torch.tensor(delay), noise=noise)
            chunks.append(out[0].float().numpy())
        return np.stack(chunks)


    # fp32: OpenTau's float32 path is its ONNX-export one; select it the same way OpenTau does.
    fp32 = lambda: torch.float32
    modeling_pi05._preferred_dtype = pwe._preferred_dtype = fp32
    policy.float()
    out32 = run(torch.float32)
    modeling_pi05._preferred_dtype = pwe._preferred_dtype = lambda: torch.bfloat16
    # The network in bf16 with SigLIP's patch/position embeddings kept fp32, as OpenTau serves it; the
    # normalisation statistics and the inputs stay fp32 (OpenTau's server also rounds those to bf16,
    # which serve_app deliberately does not).
    to_dtype_preserving_siglip_float32(policy.model, dtype=torch.bfloat16, device="cpu")
    out16 = run(torch.bfloat16)
    np.savez(os.path.join(work, "opentau_out.npz"), fp32=out32, bf16=out16)
    print("opentau", __import__("opentau").__version__, "transformers", transformers.__version__, "torch", torch.__version__)
    '''
)


def opentau_python(venv: Path) -> Path | None:
    python = venv / "bin" / "python"
    if not python.is_file():
        return None
    probe = subprocess.run([str(python), "-c", "import opentau, sentencepiece"], capture_output=True, check=False)
    return python if probe.returncode == 0 else None


def make_inputs(work: Path, train_config: dict, seed: int) -> dict:
    from pi05_make_tiny_checkpoint import CORPUS  # noqa: F401  (same alphabet as the tokenizer)

    p = train_config["policy"]
    rng = np.random.default_rng(seed)
    res, cams, chunk = train_config["resolution"][0], train_config["num_cams"], p["chunk_size"]
    sd, ad = p["input_features"]["state"]["shape"][0], p["output_features"]["actions"]["shape"][0]
    arrays = {
        "images": rng.integers(0, 256, (BATCH, cams, res, res, 3), dtype=np.uint8),
        "state": rng.uniform(-1.5, 1.5, (BATCH, sd)).astype(np.float32),
        "prefix": rng.normal(0, 1, (BATCH, chunk, ad)).astype(np.float32),
        "noise": rng.normal(0, 1, (BATCH, chunk, p["max_action_dim"])).astype(np.float32),
    }
    np.savez(work / "inputs.npz", **arrays)
    return arrays


def run_ours(ckpt: Path, arrays: dict, prompts: list[str], bf16: bool) -> np.ndarray:
    from serve_app.checkpoint import open_checkpoint
    from serve_app.observation import ObservationBatch
    from serve_app.policies.pi05.policy import load, to_bf16_keeping_vision_embeddings

    policy = load(open_checkpoint(ckpt), "cpu")
    if bf16:
        to_bf16_keeping_vision_embeddings(policy.model)
    b = len(prompts)
    batch = ObservationBatch(
        images=arrays["images"],
        camera_mask=np.ones(arrays["images"].shape[:2], bool),
        state=arrays["state"],
        prompts=prompts,
        prefix=arrays["prefix"],
        delay=np.array(DELAYS[:b], dtype=np.int64),
    )
    return policy.predict(batch, noise=arrays["noise"])  # one batched call: prefix pass once, denoising batched


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=Path(os.environ.get("OPENTAU_VENV", "/work/opentau-venv")))
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    python = opentau_python(args.venv)
    if python is None:
        print(f"skipped: no OpenTau environment at {args.venv} (make one with uv: see docs/pi05.md)")
        return 0

    from pi05_make_tiny_checkpoint import tiny_train_config, train_tokenizer

    work = args.workdir or Path(tempfile.mkdtemp(prefix="pi05-parity-"))
    (work / "ckpt").mkdir(parents=True, exist_ok=True)
    train_config = tiny_train_config(action_dim=8)  # OpenTau's server needs action dim == max_action_dim
    train_tokenizer(work / "ckpt" / "tokenizer.model")
    prompts = ["pick up the cube", "put the red block in the bin", "fold the towel, then wipe the table"]
    arrays = make_inputs(work, train_config, args.seed)
    spec = {
        "policy": train_config["policy"],
        "num_cams": train_config["num_cams"],
        "seed": args.seed,
        "prompts": prompts,
        "delays": DELAYS,
    }
    (work / "spec.json").write_text(json.dumps(spec))
    (work / "opentau_worker.py").write_text(WORKER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    done = subprocess.run(
        [str(python), str(work / "opentau_worker.py"), str(work)], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-6000:], sep="\n")
        print("FAILED: OpenTau worker")
        return 1
    print(done.stdout.strip().splitlines()[-1])
    ref = np.load(work / "opentau_out.npz")

    ours32 = run_ours(work / "ckpt", arrays, prompts, bf16=False)
    ours16 = run_ours(work / "ckpt", arrays, prompts, bf16=True)
    fp32_diff = float(np.abs(ours32 - ref["fp32"]).max())
    scale = float(np.abs(ref["bf16"]).max())
    bf16_rel = float(np.abs(ours16 - ref["bf16"]).max()) / scale
    bf16_vs_fp32 = float(np.abs(ref["bf16"] - ref["fp32"]).max()) / float(np.abs(ref["fp32"]).max())
    rows_equal = all(np.array_equal(ours32[i, :d], arrays["prefix"][i, :d]) for i, d in enumerate(DELAYS))
    print(f"checkpoint (written by OpenTau): {work / 'ckpt'}")
    print(f"chunk shape {ours32.shape}, max |action| {float(np.abs(ref['fp32']).max()):.3f}, delays {DELAYS}")
    print(f"fp32 max abs diff  ours vs OpenTau: {fp32_diff:.3e}  (target <= {FP32_TARGET:g})")
    print(
        f"bf16 max abs diff / max |chunk|  : {bf16_rel:.3e}  (target <= {BF16_TARGET:g}; "
        f"OpenTau's own bf16 vs fp32: {bf16_vs_fp32:.3e})"
    )
    print(f"RTC prefix rows returned exactly: {rows_equal}")
    ok = fp32_diff <= FP32_TARGET and bf16_rel <= BF16_TARGET and rows_equal
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
