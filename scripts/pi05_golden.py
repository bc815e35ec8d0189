"""Golden fixtures for pi05: OpenTau 0.14.0's own action chunks, written once, checked in CI.

    python scripts/pi05_golden.py [--venv /work/opentau-venv] [--workdir DIR]

Regenerates tests/fixtures/pi05_golden/ (see its README.md) and then runs
tests/test_pi05_golden.py, which checks serve_app's whole request path against it
and needs only our own environment.

1. Here: synthetic camera frames (PNG and JPEG files), cases (cameras, prompt,
   state, RTC prefix, delay) and per-case noise; each case becomes the
   ObservationRequest bytes a robot would send (`wire_request`).
2. In OpenTau's environment (Python 3.10, `uv pip install opentau==0.14.0
   sentencepiece`), OpenTau's own code builds a tiny pi05 (its network sizes
   patched down, its parameters seeded), saves it with `save_pretrained`, loads
   it back with `from_pretrained`, parses those very bytes with its own
   protobuf stubs and samples every case with the fixed noise, under two image
   transforms:
     training        PIL decode -> float /255 -> LeRobotDataset.resize_with_pad
                     (raw float32 frames as sent); state, prompt and prefix as
                     OpenTau's gRPC server prepares them
     opentau_server  OpenTau's gRPC server end to end: RobotPolicyServicer.
                     _prepare_observation and its _decode_image (PIL stretch)
   in fp32 (and, for `training`, with the network in bf16 as OpenTau serves it).
3. Here: the checkpoint, frames, cases.json and golden.npz land in the fixture
   folder; the CI test runs.

OpenTau would fetch its tokenizer (google/paligemma-3b-pt-224) and the FAST
action tokenizer from the Hugging Face hub; the worker hands it a local
tokenizer.model instead and a stand-in for FAST (whose only effect at inference
is the size of two training-only heads). That patching happens in the worker,
never in the serving path.

Exit status: 0 fixtures written and the CI test passes; 1 a step failed (the
message says which); 2 NOT RUN, because OpenTau's environment is absent (the
fixtures are left as they were).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # testbed/ is not installed: it is imported from the checkout

from testbed.opentau_env import DEFAULT_VENV, opentau_python  # noqa: E402
FIXTURES = REPO_ROOT / "tests" / "fixtures" / "pi05_golden"
TEST = REPO_ROOT / "tests" / "test_pi05_golden.py"
TRANSFORMS = ("training", "opentau_server")
SEED = 0
RESOLUTION = 224  # PaliGemma-224's input: the model's size, patch 14
CHUNK, MAX_DELAY = 10, 3
STATE_DIM = ACTION_DIM = MAX_DIM = 8  # OpenTau's server needs action dim == max_action_dim

# name -> (height, width): the committed lossless source frames (JPEGs are made from them).
FRAMES = {
    "a_224x224": (224, 224),
    "b_224x224": (224, 224),
    "c_640x480": (480, 640),
    "d_1280x720": (720, 1280),
    "e_480x640": (640, 480),  # portrait
    "f_256x256": (256, 256),  # the source of a raw float32 frame off the model's size
}

# Camera forms: jpeg / png (the file as sent), raw_float32 (OpenTau's raw layout: float32 HWC in [0, 1],
# square), raw_uint8 (ours: uint8 HWC with width and height; not an OpenTau server feature).
CASES = [
    ("224_jpeg_png", [("a_224x224", "jpeg"), ("b_224x224", "png")]),
    ("224_raw_float32", [("a_224x224", "raw_float32"), ("b_224x224", "raw_float32")]),
    ("224_raw_uint8", [("a_224x224", "raw_uint8"), ("b_224x224", "raw_uint8")]),
    ("640x480_jpeg", [("c_640x480", "jpeg"), ("e_480x640", "jpeg")]),
    ("640x480_png", [("c_640x480", "png"), ("a_224x224", "png")]),
    ("640x480_raw_uint8", [("c_640x480", "raw_uint8"), ("b_224x224", "raw_uint8")]),
    ("1280x720_jpeg", [("d_1280x720", "jpeg"), ("b_224x224", "jpeg")]),
    ("1280x720_png", [("d_1280x720", "png"), ("c_640x480", "png")]),
    ("1280x720_raw_uint8", [("d_1280x720", "raw_uint8"), ("e_480x640", "raw_uint8")]),
    ("480x640_jpeg", [("e_480x640", "jpeg"), ("d_1280x720", "jpeg")]),
    ("480x640_png", [("e_480x640", "png"), ("b_224x224", "png")]),
    ("480x640_raw_uint8", [("e_480x640", "raw_uint8"), ("c_640x480", "raw_uint8")]),
    ("256_raw_float32", [("f_256x256", "raw_float32"), ("a_224x224", "raw_float32")]),
    ("one_camera_jpeg", [("c_640x480", "jpeg")]),  # camera 1 missing
    ("one_camera_224_png", [("b_224x224", "png")]),  # camera 1 missing, camera 0 untouched
]
PROMPTS = [
    "pick up the cube",
    "put the red block in the bin",
    "fold the towel, then wipe the table",
    "",
    "open the drawer and push the button, then fold the towel, stack the cups and wipe the table",  # truncated
]
# Transformed frames OpenTau hands its model, kept for a direct check of our transforms: (transform, case, camera).
# The server's are uint8 / 255 and are kept as uint8; the training ones are float32 (the folder's largest files).
KEPT_FRAMES = [
    ("training", "1280x720_png", 0),  # padded at the top
    ("training", "480x640_png", 0),  # padded on the left
    ("opentau_server", "1280x720_png", 0),
    ("opentau_server", "480x640_png", 0),
    ("opentau_server", "256_raw_float32", 0),  # float32 -> uint8 by truncation -> PIL
]


# --- what both sides read: the cases as a robot sends them -----------------------------------------


def load_cases(root: Path = FIXTURES) -> dict:
    return json.loads((root / "cases.json").read_text())


def unit_float_frame(pixels: np.ndarray) -> np.ndarray:
    """uint8 HWC -> float32 HWC in [0, 1], off the 1/255 grid (a fixed sub-level dither; exact IEEE arithmetic)."""
    y, x, c = np.indices(pixels.shape)
    dither = ((3 * y + 5 * x + 7 * c) % 16) / 16.0 - 0.5
    return np.clip((pixels.astype(np.float64) + dither) / 255.0, 0.0, 1.0).astype("<f4")


def camera_image(camera: dict, root: Path):
    """One CameraImage: a committed JPEG/PNG file as is, or raw pixels derived from a committed PNG."""
    from PIL import Image

    from policy_wire import robot_inference_pb2 as pb

    data = (root / camera["file"]).read_bytes()
    form = camera["form"]
    if form in ("jpeg", "png"):
        return pb.CameraImage(image_data=data, encoding=form)
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    if form == "raw_uint8":
        h, w = pixels.shape[:2]
        return pb.CameraImage(image_data=pixels.tobytes(), encoding="raw", width=w, height=h)
    if form == "raw_float32":
        return pb.CameraImage(image_data=unit_float_frame(pixels).tobytes(), encoding="raw")
    raise ValueError(f"unknown camera form {form!r}")


def wire_request(case: dict, root: Path = FIXTURES):
    """The ObservationRequest of one case, as policy_wire builds it."""
    from policy_wire import robot_inference_pb2 as pb

    request = pb.ObservationRequest(
        images=[camera_image(camera, root) for camera in case["cameras"]],
        robot_state=pb.RobotState(state=case["state"]),
        prompt=case["prompt"],
        request_id=case["id"],
    )
    if case["prefix"] is not None:
        request.prefix_action.extend(pb.ActionVector(values=row) for row in case["prefix"])
        request.delay = case["delay"]
    return request


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- generation (here) -------------------------------------------------------------------------------


def synthetic_frame(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth uint8 RGB: colour gradients, discs, a fine checkerboard patch and mild 4x4-block noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    angles = rng.uniform(0, 2 * np.pi, 3)
    img = np.stack([127 + 200 * (np.cos(a) * (x / w - 0.5) + np.sin(a) * (y / h - 0.5)) for a in angles], -1)
    for _ in range(4):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.05, 0.2) * min(h, w)
        img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    top, left, ph, pw = int(rng.uniform(0, 0.7 * h)), int(rng.uniform(0, 0.7 * w)), h // 8, w // 8
    checks = ((x[top : top + ph, left : left + pw] // 2 + y[top : top + ph, left : left + pw] // 2) % 2)[..., None]
    img[top : top + ph, left : left + pw] = np.where(checks > 0, 230, 25)
    noise = rng.integers(-3, 4, (h // 4 + 1, w // 4 + 1, 3)).repeat(4, 0).repeat(4, 1)[:h, :w]
    return np.clip(np.rint(img) + noise, 0, 255).astype(np.uint8)


def write_frames(out: Path) -> None:
    from PIL import Image

    (out / "frames").mkdir(parents=True, exist_ok=True)
    for i, (name, (h, w)) in enumerate(FRAMES.items()):
        image = Image.fromarray(synthetic_frame(h, w, seed=100 + i))
        image.save(out / "frames" / f"{name}.png", optimize=True)
        if any((name, "jpeg") in cameras for _, cameras in CASES):
            image.save(out / "frames" / f"{name}.jpg", quality=90)


def make_cases(out: Path) -> list[dict]:
    rng = np.random.default_rng(SEED + 1)
    cases = []
    for i, (case_id, cameras) in enumerate(CASES):
        state_len = STATE_DIM if i % 3 else STATE_DIM - 2  # some robots send fewer values: zero-padded
        with_prefix = i % 5 != 4
        rows, width = (CHUNK // 2, ACTION_DIM - 2) if i % 4 == 1 else (CHUNK, ACTION_DIM)  # some short and narrow
        prefix = rng.normal(0, 1, (rows, width)).astype(np.float32)
        case = {
            "id": case_id,
            "cameras": [
                {"frame": name, "form": form, "file": f"frames/{name}.{'jpg' if form == 'jpeg' else 'png'}"}
                for name, form in cameras
            ],
            "prompt": PROMPTS[i % len(PROMPTS)],
            "state": rng.uniform(-1.5, 1.5, state_len).astype(np.float32).tolist(),
            "prefix": prefix.tolist() if with_prefix else None,
            "delay": i % (MAX_DELAY + 1) if with_prefix else 0,
            # OpenTau's server knows no raw uint8 (width/height are our extension): those cases are training-only.
            "transforms": [t for t in TRANSFORMS if t == "training" or all(f != "raw_uint8" for _, f in cameras)],
        }
        request = wire_request(case, out)
        for camera, image in zip(case["cameras"], request.images):
            camera["sha256"] = sha256(image.image_data)
            if camera["form"] == "raw_uint8":
                camera["width"], camera["height"] = image.width, image.height
        case["request_sha256"] = sha256(request.SerializeToString())
        cases.append(case)
    return cases


def tiny_module():
    """scripts/pi05_make_tiny_checkpoint.py: the tiny pi05's sizes and its tokenizer."""
    spec = importlib.util.spec_from_file_location("pi05_tiny", REPO_ROOT / "scripts" / "pi05_make_tiny_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def golden_train_config() -> dict:
    """The tiny pi05 of scripts/pi05_make_tiny_checkpoint.py at PaliGemma's real input size (224, patch 14)."""
    config = tiny_module().tiny_train_config(
        num_cams=2, state_dim=STATE_DIM, action_dim=ACTION_DIM, max_dim=MAX_DIM, chunk=CHUNK, max_delay=MAX_DELAY
    )
    p = config["policy"]
    p["paligemma_config"] = copy.deepcopy(p["paligemma_config"])
    p["paligemma_config"]["vision_config"].update(patch_size=14, image_size=RESOLUTION)
    for feature in p["input_features"].values():
        if feature["type"] == "VISUAL":
            feature["shape"] = [3, RESOLUTION, RESOLUTION]
    p["resize_imgs_with_padding"] = config["resolution"] = [RESOLUTION, RESOLUTION]
    return config


def stage_inputs(work: Path) -> Path:
    """Frames, tokenizer, cases, noise and wire requests for the worker; returns the staged fixture folder."""
    staged = work / "fixtures"
    shutil.rmtree(staged, ignore_errors=True)
    (staged / "checkpoint").mkdir(parents=True)
    write_frames(staged)
    tiny_module().train_tokenizer(staged / "checkpoint" / "tokenizer.model")
    cases = make_cases(staged)
    noise = np.random.default_rng(SEED + 2).normal(0, 1, (len(cases), CHUNK, MAX_DIM)).astype(np.float32)
    np.save(work / "noise.npy", noise)
    (work / "requests").mkdir(exist_ok=True)
    for i, case in enumerate(cases):
        (work / "requests" / f"{i}.bin").write_bytes(wire_request(case, staged).SerializeToString())
    ids = [c["id"] for c in cases]
    spec = {
        "train_config": golden_train_config(),
        "seed": SEED,
        "cases": cases,
        "kept_frames": [[t, ids.index(case_id), cam] for t, case_id, cam in KEPT_FRAMES],
        "ckpt": str(staged / "checkpoint"),
    }
    (work / "spec.json").write_text(json.dumps(spec))
    return staged


def run_worker(python: Path, work: Path) -> bool:
    (work / "opentau_worker.py").write_text(WORKER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    print(f"OpenTau worker ({python}) in {work} ...", flush=True)
    done = subprocess.run(
        [str(python), str(work / "opentau_worker.py"), str(work)], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-6000:], sep="\n")
        return False
    print(done.stdout.strip())
    return True


def write_fixtures(work: Path, staged: Path) -> None:
    """The worker's results beside the staged inputs, then the staged folder replaces FIXTURES (README kept)."""
    cases = json.loads((work / "spec.json").read_text())["cases"]
    versions = json.loads((work / "versions.json").read_text())
    decoded = json.loads((work / "decoded.json").read_text())
    for case in cases:
        for cam, camera in enumerate(case["cameras"]):
            if camera["form"] in ("jpeg", "png"):
                camera["pil_decoded_sha256"] = decoded[case["id"]][cam]
    with np.load(work / "opentau_out.npz") as result:
        arrays = {"noise": np.load(work / "noise.npy"), **{k: result[k] for k in result.files}}
    np.savez_compressed(staged / "golden.npz", **arrays)
    manifest = {
        "made_by": "scripts/pi05_golden.py",
        "versions": versions,
        "transforms": list(TRANSFORMS),
        "resolution": [RESOLUTION, RESOLUTION],
        "chunk_length": CHUNK,
        "max_delay": MAX_DELAY,
        "kept_frames": [{"transform": t, "case": case_id, "camera": cam} for t, case_id, cam in KEPT_FRAMES],
        "cases": cases,
    }
    (staged / "cases.json").write_text(json.dumps(manifest, indent=1) + "\n")
    if (FIXTURES / "README.md").is_file():
        shutil.copy(FIXTURES / "README.md", staged / "README.md")
    shutil.rmtree(FIXTURES, ignore_errors=True)
    shutil.copytree(staged, FIXTURES)
    size = sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file())
    print(f"fixtures: {FIXTURES} ({size / 1e6:.2f} MB); versions {versions}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--workdir", type=Path, default=None, help="keep OpenTau's worker files here")
    args = parser.parse_args()

    python = opentau_python(args.venv)
    if python is None:
        print(
            f"NOT RUN: no OpenTau 0.14.0 environment (with sentencepiece) at {args.venv}; "
            "the golden fixtures were NOT regenerated. Make one with uv (docs/pi05.md) or pass --venv."
        )
        return 2
    work = args.workdir or Path(tempfile.mkdtemp(prefix="pi05-golden-"))
    staged = stage_inputs(work)
    if not run_worker(python, work):
        print("FAILED: the OpenTau worker; the fixtures were NOT regenerated")
        return 1
    write_fixtures(work, staged)
    check = subprocess.run([sys.executable, "-m", "pytest", "-q", str(TEST)], cwd=REPO_ROOT, check=False)
    print("PASS" if check.returncode == 0 else "FAIL: tests/test_pi05_golden.py (the fixtures were written)")
    return 0 if check.returncode == 0 else 1


# --- the worker: runs inside OpenTau's venv, OpenTau's own code only --------------------------------

WORKER = textwrap.dedent(
    '''
    """Build, save, reload and sample a tiny pi05 with OpenTau 0.14.0's own code, from our wire bytes."""
    import functools, hashlib, io, json, os, sys, types
    import numpy as np
    import torch
    from PIL import Image

    work = sys.argv[1]
    spec = json.load(open(os.path.join(work, "spec.json")))
    tc, ckpt = spec["train_config"], spec["ckpt"]
    p = tc["policy"]
    noise_all = np.load(os.path.join(work, "noise.npy"))

    import transformers
    from transformers import GemmaTokenizerFast

    tokenizer = GemmaTokenizerFast(vocab_file=os.path.join(ckpt, "tokenizer.model"))


    class LocalFast:  # stand-in for physical-intelligence/fast: only its vocab size reaches the network
        vocab_size = p["discrete_action_vocab_size"]


    transformers.AutoTokenizer.from_pretrained = lambda *a, **k: tokenizer
    transformers.AutoProcessor.from_pretrained = lambda *a, **k: LocalFast()

    import opentau
    from transformers.models.auto import CONFIG_MAPPING
    from opentau.configs.types import FeatureType, PolicyFeature
    from opentau.datasets.lerobot_dataset import LeRobotDataset
    from opentau.policies.pi05 import modeling_pi05, paligemma_with_expert as pwe
    from opentau.policies.pi05.configuration_pi05 import PI05Config
    from opentau.policies.utils import to_dtype_preserving_siglip_float32
    from opentau.scripts.grpc import robot_inference_pb2 as opentau_pb
    from opentau.scripts.grpc.server import RobotPolicyServicer

    modeling_pi05.AutoTokenizer.from_pretrained = transformers.AutoTokenizer.from_pretrained
    modeling_pi05.AutoProcessor.from_pretrained = transformers.AutoProcessor.from_pretrained
    modeling_pi05.PI05Policy._check_discrete_action_tokenizer_convention = lambda self, path: None

    pali, expert = p["paligemma_config"], p["gemma_expert_config"]
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


    def make_config():
        return PI05Config(
            input_features=feats(p["input_features"]), output_features=feats(p["output_features"]),
            chunk_size=p["chunk_size"], n_action_steps=p["chunk_size"], max_state_dim=p["max_state_dim"],
            max_action_dim=p["max_action_dim"], proj_width=p["proj_width"], prompt_max_length=p["prompt_max_length"],
            resize_imgs_with_padding=tuple(p["resize_imgs_with_padding"]), max_delay=p["max_delay"],
            num_steps=p["num_steps"], state_type=p["state_type"], use_torch_compile=False)


    g = torch.Generator().manual_seed(spec["seed"])
    sd, ad = p["input_features"]["state"]["shape"][0], p["output_features"]["actions"]["shape"][0]
    stats = [{
        "state": {"mean": torch.rand(sd, generator=g) - 0.5, "std": 0.3 + torch.rand(sd, generator=g)},
        "actions": {"mean": torch.rand(ad, generator=g) - 0.5, "std": 0.3 + torch.rand(ad, generator=g),
                    "min": -1 - torch.rand(ad, generator=g), "max": 1 + torch.rand(ad, generator=g)},
    }]
    torch.manual_seed(spec["seed"])
    built = modeling_pi05.PI05Policy(make_config(), per_dataset_stats=stats)
    with torch.no_grad():  # OpenTau zero-initialises the adaRMS and some norms: give every path signal
        for name, param in built.model.named_parameters():
            scale = 0.3 if param.ndim == 1 else 1.0 / param.shape[-1] ** 0.5
            param.add_((scale * torch.randn(param.shape, generator=g)).to(param.dtype))
    built.save_pretrained(ckpt)
    policy_section = json.load(open(os.path.join(ckpt, "config.json")))
    policy_section.update({k: p[k] for k in ("paligemma_config", "gemma_expert_config", "discrete_action_vocab_size")})
    train_config = {k: tc[k] for k in ("resolution", "num_cams", "max_state_dim", "max_action_dim", "action_chunk")}
    train_config["policy"] = policy_section
    json.dump(train_config, open(os.path.join(ckpt, "train_config.json"), "w"), indent=2)

    # What OpenTau serves is what from_pretrained reads back, not the object that wrote it.
    policy = modeling_pi05.PI05Policy.from_pretrained(ckpt, config=make_config())
    written, loaded = built.state_dict(), policy.state_dict()
    assert written.keys() == loaded.keys() and all(torch.equal(written[k], loaded[k]) for k in written), "reload"
    del built

    # fp32: OpenTau's float32 path is its ONNX-export one; select it the same way OpenTau does.
    modeling_pi05._preferred_dtype = pwe._preferred_dtype = lambda: torch.float32
    policy.float().eval()

    res = tuple(tc["resolution"])
    server = types.SimpleNamespace(  # the servicer's state that _prepare_observation/_decode_image read
        cfg=types.SimpleNamespace(
            resolution=res, num_cams=tc["num_cams"], max_state_dim=tc["max_state_dim"],
            max_action_dim=tc["max_action_dim"], action_chunk=tc["action_chunk"],
            server=types.SimpleNamespace(robot_type=None, control_mode=None, dataset_repo_id=None)),
        device=torch.device("cpu"), dtype=torch.float32)
    server._decode_image = functools.partial(RobotPolicyServicer._decode_image, server)
    requests = [opentau_pb.ObservationRequest.FromString(open(os.path.join(work, "requests", f"{i}.bin"), "rb").read())
                for i in range(len(spec["cases"]))]


    def training_frame(camera, image):
        """Decoded as OpenTau's data pipeline sees frames: float CHW in [0, 1], then its resize_with_pad."""
        if camera["form"] in ("jpeg", "png"):
            x = torch.from_numpy(np.array(Image.open(io.BytesIO(image.image_data)).convert("RGB")))
            x = x.permute(2, 0, 1).float() / 255.0
        elif camera["form"] == "raw_float32":
            side = int(round((len(image.image_data) / 12) ** 0.5))
            x = torch.from_numpy(np.frombuffer(image.image_data, "<f4").reshape(side, side, 3).copy()).permute(2, 0, 1)
        else:  # raw_uint8: our extension; width/height are fields OpenTau's stubs do not know
            pixels = np.frombuffer(image.image_data, np.uint8).reshape(camera["height"], camera["width"], 3)
            x = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255.0
        return LeRobotDataset.resize_with_pad(None, x, res[1], res[0], pad_value=0)[None]


    def observation(i, transform):
        """OpenTau's model input for case i: (batch, action_prefix, delay, padded camera keys)."""
        case, request = spec["cases"][i], requests[i]
        if transform == "opentau_server":
            batch, prefix, delay = RobotPolicyServicer._prepare_observation(server, request)
        else:
            without_images = opentau_pb.ObservationRequest()
            without_images.CopyFrom(request)
            del without_images.images[:]
            batch, prefix, delay = RobotPolicyServicer._prepare_observation(server, without_images)
            for c, (camera, image) in enumerate(zip(case["cameras"], request.images)):
                batch[f"camera{c}"] = training_frame(camera, image)
        padded = [f"camera{c}" for c in range(len(request.images), tc["num_cams"])]
        return batch, prefix, delay, padded


    def sample(batch, prefix, delay, i):
        with torch.inference_mode():
            noise = torch.from_numpy(noise_all[i : i + 1])
            return policy.sample_actions(batch, action_prefix=prefix, delay=delay, noise=noise)[0].float().numpy()


    def chunks(transform, variants):
        n = len(spec["cases"])
        out = {v: np.full((n, tc["action_chunk"], ad), np.nan, np.float32) for v in variants}
        for i, case in enumerate(spec["cases"]):
            if transform not in case["transforms"]:
                continue
            batch, prefix, delay, padded = observation(i, transform)
            if padded and "black_attended" in variants:
                # How OpenTau's server and its data pipeline pad a camera: a black frame that pi05 attends to
                # (they set img_is_pad, which pi05 never reads).
                full = dict(batch)
                for key in padded:
                    full[key] = torch.zeros(1, 3, *res)
                out["black_attended"][i] = sample(full, prefix, delay, i)
            for key in padded:  # OpenTau's prepare_images for a camera not in the batch (empty_cameras=0): left out
                batch.pop(key, None)
            out["fp32"][i] = sample(batch, prefix, delay, i)
        return out


    results, frames = {}, {}
    for transform in ("training", "opentau_server"):
        out = chunks(transform, ("fp32", "black_attended"))
        results[f"chunks_{transform}"] = out["fp32"]
        results[f"chunks_{transform}_black_attended"] = out["black_attended"]
        for kept_transform, i, cam in spec["kept_frames"]:
            if kept_transform == transform:
                frame = observation(i, transform)[0][f"camera{cam}"][0].permute(1, 2, 0).numpy()
                if transform == "opentau_server":  # PIL's uint8 output / 255: kept exactly as uint8
                    levels = np.rint(frame * 255.0).astype(np.uint8)
                    assert np.array_equal(levels.astype(np.float32) / 255.0, frame), "server frame off the 1/255 grid"
                    frame = levels
                frames[f"frame_{transform}_{spec['cases'][i]['id']}_{cam}"] = frame

    decoded = {
        case["id"]: [hashlib.sha256(np.array(Image.open(io.BytesIO(im.image_data)).convert("RGB")).tobytes()).hexdigest()
                     if cam["form"] in ("jpeg", "png") else None for cam, im in zip(case["cameras"], requests[i].images)]
        for i, case in enumerate(spec["cases"])
    }

    # bf16: the network in bf16 with SigLIP's patch/position embeddings kept fp32, as OpenTau serves it; the
    # inputs and normalisation statistics stay fp32 (OpenTau's server also rounds those to bf16; we do not).
    modeling_pi05._preferred_dtype = pwe._preferred_dtype = lambda: torch.bfloat16
    to_dtype_preserving_siglip_float32(policy.model, dtype=torch.bfloat16, device="cpu")
    results["chunks_training_bf16"] = chunks("training", ("fp32",))["fp32"]

    np.savez(os.path.join(work, "opentau_out.npz"), **results, **frames)
    json.dump(decoded, open(os.path.join(work, "decoded.json"), "w"))
    import PIL, google.protobuf
    versions = {"opentau": opentau.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                "pillow": PIL.__version__, "numpy": np.__version__, "protobuf": google.protobuf.__version__,
                "python": sys.version.split()[0]}
    json.dump(versions, open(os.path.join(work, "versions.json"), "w"))
    for transform in ("training", "opentau_server"):
        a, b = results[f"chunks_{transform}"], results[f"chunks_{transform}_black_attended"]
        both = ~np.isnan(b[:, 0, 0])
        print(f"{transform}: {int((~np.isnan(a[:, 0, 0])).sum())} cases, max |action| {np.nanmax(np.abs(a)):.3f}; "
              f"missing camera left out vs black attended: max diff {np.abs(a[both] - b[both]).max():.3e}")
    f32, b16 = results["chunks_training"], results["chunks_training_bf16"]
    print(f"OpenTau's own bf16 vs fp32 (training): max diff / max |chunk| "
          f"{np.nanmax(np.abs(b16 - f32)) / np.nanmax(np.abs(f32)):.3e}")
    '''
)


if __name__ == "__main__":
    sys.exit(main())
