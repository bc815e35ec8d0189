"""serve_app's pi05 from whichever tree PYTHONPATH names, timed for benchmarks/pi05_cpu.py.

    PYTHONPATH=TREE python pi05_serve_app_worker.py WORKDIR THREADS

Loads WORKDIR/ckpt on the CPU and answers JSON-line commands on stdout
(the protocol of pi05_opentau_worker.py):
    {"op": "predict"}          -> {"seconds": wall time of one predict}
    {"op": "count"}            -> {"aten_events": aten:: events torch.profiler records in one predict}
    {"op": "save", "path": P}  -> the chunk of one predict saved to P (.npy)
    {"op": "info"}             -> versions, threads, prefix tokens, which tree
    {"op": "quit"}
Written against the Policy API every compared tree shares: load(checkpoint, "cpu"), predict(batch, noise).
"""

import json
import os
import sys
import time

RESPONSES = os.fdopen(os.dup(1), "w", buffering=1)
sys.stdout = sys.stderr  # library chatter must not reach the protocol

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main():
    work, threads = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(threads)
    import serve_app
    from serve_app.checkpoint import open_checkpoint
    from serve_app.observation import ObservationBatch
    from serve_app.policies.pi05 import load

    spec = json.load(open(os.path.join(work, "spec.json")))
    policy = load(open_checkpoint(os.path.join(work, "ckpt")), "cpu")
    x = np.load(os.path.join(work, "inputs.npz"))
    batch = ObservationBatch(
        images=x["images"],
        camera_mask=np.ones(x["images"].shape[:2], bool),
        state=x["state"],
        prompts=list(spec["prompts"]),
        prefix=x["prefix"],
        delay=x["delay"],
    )
    noise = x["noise"]
    prefix_tokens = []
    embed_prefix = policy.model.embed_prefix

    def recording_embed_prefix(*args, **kwargs):
        embs, pad = embed_prefix(*args, **kwargs)
        prefix_tokens.append(int(embs.shape[1]))
        return embs, pad

    policy.model.embed_prefix = recording_embed_prefix
    predict = lambda: policy.predict(batch, noise=noise)  # noqa: E731
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
            np.save(cmd["path"], predict())
            RESPONSES.write(json.dumps({"saved": cmd["path"]}) + "\n")
        elif cmd["op"] == "info":
            info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "tree": serve_app.__file__,
                    "prefix_tokens": prefix_tokens[-1] if prefix_tokens else None}
            RESPONSES.write(json.dumps(info) + "\n")
        else:
            break


if __name__ == "__main__":
    main()
