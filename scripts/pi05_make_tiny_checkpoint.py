"""Write a tiny pi05 checkpoint (seeded weights, no OpenTau needed): train_config.json,
model.safetensors and a tiny SentencePiece tokenizer.model trained on the fly.

    python scripts/pi05_make_tiny_checkpoint.py --out /tmp/pi05-tiny [--seed 0]

The layout is OpenTau's (pipeline keys at the top, OpenTau's PI05Config in
`policy`); the network sizes come from `policy.paligemma_config` /
`policy.gemma_expert_config`, which OpenTau's full-size checkpoints omit. The
weights are random: the checkpoint exercises the serving path and the model's
arithmetic in a few milliseconds, its actions mean nothing on a robot.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

TINY_ARCH = {
    "paligemma_config": {
        "projection_dim": 64,
        "text_config": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "vocab_size": 512,
        },
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "patch_size": 8,
            "image_size": 32,
        },
    },
    "gemma_expert_config": {
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "vocab_size": 512,
    },
}

# Enough text for BPE merges over the prompt alphabet; digits are split one per piece.
CORPUS = [
    "Task: pick up the cube, State: 12 128 255 3 77 0 201 64;\n",
    "Task: put the red block in the bin, State: 1 2 3 4 5 6 7 8 9 0;\n",
    "Task: open the drawer and push the button, State: 128 128 128;\n",
    "Task: fold the towel, stack the cups, wipe the table, ",
    "State: ",
    ":\n",
]


def train_tokenizer(path: Path, vocab_size: int = 320) -> Path:
    """A Gemma-style SentencePiece BPE model: pad 0, eos 1, bos 2, unk 3, byte fallback, no dummy prefix."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 40),
        model_prefix=str(path.with_suffix("")),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n"],
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    path.with_suffix(".vocab").unlink(missing_ok=True)
    return path


def tiny_train_config(
    num_cams: int = 2, state_dim: int = 8, action_dim: int = 6, max_dim: int = 8, chunk: int = 4, max_delay: int = 2
) -> dict:
    res = TINY_ARCH["paligemma_config"]["vision_config"]["image_size"]
    policy = {
        "type": "pi05",
        "n_obs_steps": 1,
        "normalization_mapping": {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"},
        "input_features": {
            **{f"camera{i}": {"type": "VISUAL", "shape": [3, res, res]} for i in range(num_cams)},
            "state": {"type": "STATE", "shape": [state_dim]},
        },
        "output_features": {"actions": {"type": "ACTION", "shape": [action_dim]}},
        "use_torch_compile": False,
        "pretrained_path": None,
        "dataset_names": None,
        "config_version": 1,
        "chunk_size": chunk,
        "n_action_steps": chunk,
        "max_state_dim": max_dim,
        "max_action_dim": max_dim,
        "predict_response": False,
        "state_type": "discrete",
        "resize_imgs_with_padding": [res, res],
        "empty_cameras": 0,
        "prompt_max_length": 48,
        "proj_width": TINY_ARCH["gemma_expert_config"]["hidden_size"],
        "num_steps": 10,
        "max_delay": max_delay,
        "attention_implementation": "eager",
        "delta_action_state_map": None,
        "discrete_action_vocab_size": 64,
        **TINY_ARCH,
    }
    return {
        "resolution": [res, res],
        "num_cams": num_cams,
        "max_state_dim": max_dim,
        "max_action_dim": max_dim,
        "action_chunk": chunk,
        "policy": policy,
        "server": {"port": 50051, "max_workers": 4},
    }


def make_tiny(out: Path, seed: int = 0, **config_overrides) -> Path:
    from safetensors.torch import save_file

    from serve_app.checkpoint import open_checkpoint
    from serve_app.policies.pi05 import Pi05Config, Pi05Network

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_config = tiny_train_config(**config_overrides)
    train_config["notes"] = f"tiny seeded pi05 (seed {seed}) from scripts/pi05_make_tiny_checkpoint.py; not trained"
    (out / "train_config.json").write_text(json.dumps(train_config, indent=2) + "\n")
    train_tokenizer(out / "tokenizer.model")

    (out / "model.safetensors").touch()  # open_checkpoint wants the file; it is written below
    config = Pi05Config.from_checkpoint(open_checkpoint(out))
    generator = torch.Generator().manual_seed(seed)
    net = Pi05Network(config)
    state = {}
    for name, tensor in net.state_dict().items():
        if ".buffer_" in name:
            state[name] = _stats(name, tensor.shape, generator)
        elif "vision_tower" in name and "norm" in name and name.endswith(".weight"):
            state[name] = 1.0 + 0.1 * torch.randn(tensor.shape, generator=generator)  # LayerNorm scale
        elif "language_model" in name and "norm" in name:
            state[name] = 0.1 * torch.randn(tensor.shape, generator=generator)  # Gemma scales by (1 + w)
        else:
            std = 0.3 if tensor.ndim == 1 else 1.0 / tensor.shape[-1] ** 0.5
            if "lm_head" in name or "embedding" in name:
                std = 0.5
            state[name] = std * torch.randn(tensor.shape, generator=generator)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    return out


def _stats(name: str, shape, generator) -> torch.Tensor:
    """Plausible joint-space statistics: means in +-0.5, std/range 0.2-1."""
    r = torch.rand(shape, generator=generator)
    if name.endswith((".mean", ".min", ".q01")):
        return r - 0.5 - (1.0 if name.endswith(("min", "q01")) else 0.0)
    if name.endswith((".max", ".q99")):
        return r + 0.5
    return 0.2 + 0.8 * r  # std


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_tiny(args.out, args.seed))


if __name__ == "__main__":
    main()
