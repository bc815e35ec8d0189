"""JPEG decoders side by side on a robot camera frame (224x224 -> model resolution 96x96).

    python -m benchmarks.decoders   # writes benchmarks/results/decoders.json

`torchvision.io.decode_jpeg` batched on a GPU is the next step where there is
one; this machine has none, so it is not measured here.
"""

from __future__ import annotations

import io
import json
import time

import numpy as np
import simplejpeg
from PIL import Image

from benchmarks.robots import camera_jpeg
from benchmarks.servers import REPO_ROOT
from serve_app.frames import Letterbox
from serve_app.images import decode_image


def per_call_us(fn, seconds: float = 1.5) -> float:
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    data = camera_jpeg(3)
    target = (96, 96)
    letterbox = lambda frame, _target: Letterbox(target)(frame)
    candidates = {
        "pillow": lambda: letterbox(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), target),
        "pillow_draft": lambda: letterbox(_pillow_draft(data, target), target),
        "simplejpeg": lambda: letterbox(simplejpeg.decode_jpeg(data, colorspace="RGB"), target),
        "simplejpeg_dct_scaled": lambda: letterbox(
            simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=96, min_width=96), target
        ),
        "serve_app.decode_image": lambda: letterbox(decode_image(data, "jpeg", target_hw=target), target),
    }
    results = {name: round(per_call_us(fn), 1) for name, fn in candidates.items()}
    report = {"frame": "224x224 JPEG q85 -> 96x96 letterboxed", "us_per_frame": results}
    (REPO_ROOT / "benchmarks" / "results" / "decoders.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def _pillow_draft(data: bytes, target) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (target[1], target[0]))
    return np.asarray(image.convert("RGB"))


if __name__ == "__main__":
    main()
