"""The README's performance tables, as markdown, from one benchmarks/results/serving.json.

    python -m benchmarks.report [benchmarks/results/serving.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.servers import REPO_ROOT

SERVERS = ("direct", "serve_haproxy", "serve_haproxy_1replica", "serve_default")


def _cell(row: dict | None, what: str) -> str:
    if row is None:
        return "-"
    lat = row["latency_ms"]
    if what == "p50":
        return f"{lat['p50']:.2f} ms"
    if what == "throughput_p99":
        return f"{row['throughput_per_s']:.0f}/s / {lat['p99']:.1f} ms"
    if what == "paced":
        return f"{lat['p99']:.1f} ms / {row['missed_deadlines']}"
    raise ValueError(what)


def tables(report: dict) -> str:
    servers = [s for s in SERVERS if s in report["servers"]]
    rows = [
        ("1 robot, unary, p50", "closed-unary-1", "p50"),
        ("1 robot, stream, p50", "closed-stream-1", "p50"),
        ("16 robots closed loop, unary: throughput / p99", "closed-unary-16", "throughput_p99"),
        ("16 robots closed loop, stream: throughput / p99", "closed-stream-16", "throughput_p99"),
        ("16 robots paced (30 Hz, a chunk every 4 ticks), unary: p99 / missed deadlines", "paced-unary-16", "paced"),
        ("16 robots paced (30 Hz, a chunk every 4 ticks), stream: p99 / missed deadlines", "paced-stream-16", "paced"),
        ("48 robots closed loop, stream: throughput / p99", "closed-stream-48", "throughput_p99"),
    ]
    out = ["| scenario | " + " | ".join(servers) + " |", "| --- |" + " --- |" * len(servers)]
    for label, scenario, what in rows:
        out.append(f"| {label} | " + " | ".join(_cell(report["servers"][s].get(scenario), what) for s in servers) + " |")
    batch = []
    for s in servers:
        b16, b48 = (report["servers"][s].get(k, {}).get("batch_size") or {} for k in ("closed-stream-16", "closed-stream-48"))
        batch.append(f"{b16.get('mean', '-')} / {b48.get('mean', '-')}")
    out.append("| mean forward-pass batch, 16 / 48 streams | " + " | ".join(batch) + " |")
    res = []
    for s in servers:
        r = report["servers"][s].get("closed-stream-16", {}).get("server", {})
        res.append(f"{r.get('cpu_cores', '-')} / {r.get('rss_mib', '-')} MiB")
    out.append("| server CPU (cores) / RSS, 16 streams | " + " | ".join(res) + " |")
    model = report["model_alone"]
    out += ["", "Model alone (forward passes, no serving): one thread "
            f"{model['one_thread']['by_batch_size']['1']['samples_per_s']:.0f}/s at batch 1, best "
            f"{model['one_thread']['best_samples_per_s']:.0f}/s at batch {model['one_thread']['best_batch_size']}; "
            f"all {report['environment']['machine']['cpus']} cores best {model['all_cores']['best_samples_per_s']:.0f}/s "
            f"at batch {model['all_cores']['best_batch_size']}. Input path alone (validate, decode two JPEGs, "
            f"letterbox), one thread: {model['input_path_one_thread']['observations_per_s']:.0f}/s "
            f"({model['input_path_one_thread']['us_per_observation']:.0f} us per observation)."]
    out += ["", "Targets as ratios: " + json.dumps(report["targets"])]
    return "\n".join(out)


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO_ROOT / "benchmarks" / "results" / "serving.json"
    print(tables(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
