"""OpenTau's own pi05, timed for benchmarks/pi05_cpu.py. Runs in OpenTau's venv (Python 3.10, opentau 0.14.0).

    python pi05_opentau_worker.py WORKDIR THREADS

Builds the benchmark's pi05 with OpenTau's code (its hard-coded PaliGemma-3B
sizes shrunk to WORKDIR/spec.json's, parameters seeded), saves it to
WORKDIR/ckpt for serve_app to load, then answers the JSON-line commands of
pi05_serve_app_worker.py on stdout: predict, count, save, info, quit.

OpenTau would fetch its tokenizer and the FAST action tokenizer from the
Hugging Face hub; here it gets the local tokenizer.model and a stand-in for
FAST (whose only effect at inference is the size of two training-only heads).
Its float32 path is the one OpenTau selects for ONNX export (_preferred_dtype).
"""

import json
import os
import sys
import time

RESPONSES = os.fdopen(os.dup(1), "w", buffering=1)
sys.stdout = sys.stderr  # library chatter must not reach the protocol

import numpy as np  # noqa: E402
import torch  # noqa: E402

WORK, THREADS = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(THREADS)
SPEC = json.load(open(os.path.join(WORK, "spec.json")))
CKPT = os.path.join(WORK, "ckpt")


def build_policy():
    import transformers
    from transformers import GemmaTokenizerFast
    from transformers.models.auto import CONFIG_MAPPING

    tokenizer = GemmaTokenizerFast(vocab_file=os.path.join(CKPT, "tokenizer.model"))
    p = SPEC["train_config"]["policy"]

    class LocalFast:  # stand-in for physical-intelligence/fast
        vocab_size = p["discrete_action_vocab_size"]

    transformers.AutoTokenizer.from_pretrained = lambda *a, **k: tokenizer
    transformers.AutoProcessor.from_pretrained = lambda *a, **k: LocalFast()

    from opentau.configs.types import FeatureType, PolicyFeature
    from opentau.policies.pi05 import modeling_pi05
    from opentau.policies.pi05 import paligemma_with_expert as pwe
    from opentau.policies.pi05.configuration_pi05 import PI05Config

    modeling_pi05.AutoTokenizer.from_pretrained = transformers.AutoTokenizer.from_pretrained
    modeling_pi05.AutoProcessor.from_pretrained = transformers.AutoProcessor.from_pretrained
    modeling_pi05.PI05Policy._check_discrete_action_tokenizer_convention = lambda self, path: None
    pali, expert = p["paligemma_config"], p["gemma_expert_config"]
    original_init = pwe.PaliGemmaWithExpertConfig.__init__

    def sized_init(self, *args, **kwargs):  # OpenTau hard-codes PaliGemma-3B: use the benchmark's sizes
        original_init(self, *args, **kwargs)
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

    pwe.PaliGemmaWithExpertConfig.__init__ = sized_init
    features = lambda d: {k: PolicyFeature(FeatureType[v["type"]], tuple(v["shape"])) for k, v in d.items()}
    config = PI05Config(
        input_features=features(p["input_features"]), output_features=features(p["output_features"]),
        chunk_size=p["chunk_size"], n_action_steps=p["chunk_size"], max_state_dim=p["max_state_dim"],
        max_action_dim=p["max_action_dim"], proj_width=p["proj_width"], prompt_max_length=p["prompt_max_length"],
        resize_imgs_with_padding=tuple(p["resize_imgs_with_padding"]), max_delay=p["max_delay"],
        num_steps=p["num_steps"], state_type=p["state_type"])
    g = torch.Generator().manual_seed(SPEC["seed"])
    sd, ad = p["input_features"]["state"]["shape"][0], p["output_features"]["actions"]["shape"][0]
    stats = [{
        "state": {"mean": torch.rand(sd, generator=g) - 0.5, "std": 0.3 + torch.rand(sd, generator=g)},
        "actions": {"mean": torch.rand(ad, generator=g) - 0.5, "std": 0.3 + torch.rand(ad, generator=g),
                    "min": -1 - torch.rand(ad, generator=g), "max": 1 + torch.rand(ad, generator=g)},
    }]
    torch.manual_seed(SPEC["seed"])
    policy = modeling_pi05.PI05Policy(config, per_dataset_stats=stats)
    with torch.no_grad():  # OpenTau zero-initialises adaRMS and some norms: give every path signal
        for _, param in policy.model.named_parameters():
            scale = 0.3 if param.ndim == 1 else 1.0 / param.shape[-1] ** 0.5
            param.add_((scale * torch.randn(param.shape, generator=g)).to(param.dtype))
    policy.eval()
    policy.save_pretrained(CKPT)
    section = json.load(open(os.path.join(CKPT, "config.json")))
    section.update({k: p[k] for k in ("paligemma_config", "gemma_expert_config", "discrete_action_vocab_size")})
    train_config = dict(SPEC["train_config"], policy=section)
    json.dump(train_config, open(os.path.join(CKPT, "train_config.json"), "w"), indent=2)
    # float32 throughout: OpenTau's ONNX-export dtype, selected the way OpenTau selects it
    modeling_pi05._preferred_dtype = pwe._preferred_dtype = lambda: torch.float32
    return policy.float()


def inputs_batch():
    x = np.load(os.path.join(WORK, "inputs.npz"))
    p = SPEC["train_config"]["policy"]
    images = x["images"]  # (B, N, H, W, 3) uint8
    batch = {f"camera{c}": torch.from_numpy(images[:, c]).permute(0, 3, 1, 2).float() / 255.0
             for c in range(images.shape[1])}
    state = np.zeros((images.shape[0], p["max_state_dim"]), np.float32)
    state[:, : x["state"].shape[1]] = x["state"]
    batch["state"] = torch.from_numpy(state)
    batch["prompt"] = list(SPEC["prompts"])
    prefix = torch.zeros(images.shape[0], p["chunk_size"], p["max_action_dim"])
    prefix[:, :, : x["prefix"].shape[2]] = torch.from_numpy(x["prefix"])
    return batch, prefix, torch.tensor(int(x["delay"][0])), torch.from_numpy(x["noise"])


def main():
    policy = build_policy()
    batch, prefix, delay, noise = inputs_batch()

    def predict():
        with torch.inference_mode():
            return policy.sample_actions(dict(batch), action_prefix=prefix, delay=delay, noise=noise)

    p = SPEC["train_config"]["policy"]
    patches = (p["resize_imgs_with_padding"][0] // p["paligemma_config"]["vision_config"]["patch_size"]) ** 2
    prefix_tokens = len([k for k in batch if k.startswith("camera")]) * patches + p["prompt_max_length"]
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "opentau": __import__("opentau").__version__, "transformers": __import__("transformers").__version__,
            "prefix_tokens": prefix_tokens,  # OpenTau pads every prompt to prompt_max_length
            "attention_implementation": policy.config.attention_implementation}
    RESPONSES.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "predict":
            start = time.perf_counter()
            predict()
            RESPONSES.write(json.dumps({"seconds": time.perf_counter() - start}) + "\n")
        elif cmd["op"] == "count":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                predict()
            n = sum(1 for e in prof.events() if e.name.startswith("aten::"))
            RESPONSES.write(json.dumps({"aten_events": n}) + "\n")
        elif cmd["op"] == "save":
            np.save(cmd["path"], predict().float().numpy())
            RESPONSES.write(json.dumps({"saved": cmd["path"]}) + "\n")
        elif cmd["op"] == "info":
            RESPONSES.write(json.dumps(info) + "\n")
        else:
            break


if __name__ == "__main__":
    main()
