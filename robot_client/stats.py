"""What a control run looked like: latency, jitter, starvation, chunk overlap, drops and holds.

Starvation counts ticks, after the policy first moved the robot, that had no
fresh action to run: each one is a stall the robot felt. Jitter is how late
each tick started against its schedule. Server drops are observations the
server answered DEADLINE_EXCEEDED to, unanswered, because it could not answer
them before the robot's time to starvation: not failures, the connection was fine.
"""

from __future__ import annotations

import logging
from collections import Counter, deque

import numpy as np

from robot_client.chunk_executor import MergeReport, Verdict

logger = logging.getLogger("robot_client")
_KEEP = 100_000  # samples kept per series: hours at 30 Hz of ticks, far more of chunks


def _percentiles(values, *qs) -> list[float]:
    if not values:
        return [float("nan")] * len(qs)
    return [float(v) for v in np.percentile(np.asarray(values, dtype=np.float64), qs)]


class LoopStats:
    def __init__(self):
        self.ticks = 0
        self.acted = 0
        self.starved = 0
        self.held_ticks = 0
        self.holds = 0
        self.resumes = 0
        self.requests = 0
        self.server_drops = 0  # observations the server dropped as too late to answer in time
        self.failures: Counter[str] = Counter()
        # Interventions between the plan and the motors: the loop's own (actions too old to run)
        # and those of the robot's safety layer (robot_client/safety.py), read when reported.
        self.safety: Counter[str] = Counter()
        self._safety_sources: list[tuple[Counter[str], Counter[str]]] = []  # (live counters, at start)
        self.verdicts: Counter[Verdict] = Counter()
        self.latency_ms: deque[float] = deque(maxlen=_KEEP)
        self.inference_ms: deque[float] = deque(maxlen=_KEEP)
        self.queue_ms: deque[float] = deque(maxlen=_KEEP)
        self.lateness_ms: deque[float] = deque(maxlen=_KEEP)
        self.overlap_rows: deque[int] = deque(maxlen=_KEEP)
        self.disagreement: deque[float] = deque(maxlen=_KEEP)
        self.seam_step: deque[float] = deque(maxlen=_KEEP)
        self.skipped_ticks = 0

    # --- recording ---------------------------------------------------------

    def tick(self, lateness_s: float, skipped: int = 0) -> None:
        self.ticks += 1
        self.skipped_ticks += skipped
        self.lateness_ms.append(lateness_s * 1e3)

    def chunk(self, report: MergeReport, inference_ms: float = 0.0, queue_ms: float = 0.0) -> None:
        self.verdicts[report.verdict] += 1
        if report.verdict is Verdict.STALE_EPOCH:
            return  # its round trip spans a gap: not a latency sample
        self.latency_ms.append(report.latency_s * 1e3)
        self.inference_ms.append(inference_ms)
        self.queue_ms.append(queue_ms)
        if report.verdict is Verdict.ACCEPTED:
            self.overlap_rows.append(report.overlap)
            self.disagreement.append(report.disagreement)
            self.seam_step.append(report.seam_step)

    def failure(self, code_name: str) -> None:
        self.failures[code_name] += 1

    # --- reporting --------------------------------------------------------

    def count_safety_of(self, counters: Counter[str]) -> None:
        """Report a safety layer's live counters too, from their values now on (a robot outlives loops)."""
        self._safety_sources.append((counters, Counter(counters)))

    def interventions(self) -> Counter[str]:
        total = Counter(self.safety)
        for live, at_start in self._safety_sources:
            total.update(live - at_start)
        return total

    def summary(self) -> dict:
        lat50, lat95, lat_max = _percentiles(self.latency_ms, 50, 95, 100)
        late50, late99, late_max = _percentiles(self.lateness_ms, 50, 99, 100)
        return {
            "ticks": self.ticks,
            "acted": self.acted,
            "starved": self.starved,
            "held_ticks": self.held_ticks,
            "holds": self.holds,
            "resumes": self.resumes,
            "requests": self.requests,
            "chunks_accepted": self.verdicts[Verdict.ACCEPTED],
            "chunks_dropped": {v.name.lower(): n for v, n in self.verdicts.items() if v is not Verdict.ACCEPTED},
            "server_drops": self.server_drops,
            "failures": dict(self.failures),
            "safety": dict(self.interventions()),
            "latency_ms": {"p50": lat50, "p95": lat95, "max": lat_max},
            "server_inference_ms_p50": _percentiles(self.inference_ms, 50)[0],
            "server_queue_ms_p50": _percentiles(self.queue_ms, 50)[0],
            "tick_lateness_ms": {"p50": late50, "p99": late99, "max": late_max},
            "skipped_ticks": self.skipped_ticks,
            "overlap_rows_mean": float(np.mean(self.overlap_rows)) if self.overlap_rows else float("nan"),
            "overlap_disagreement_max": float(np.max(self.disagreement)) if self.disagreement else float("nan"),
            "seam_step_max": float(np.max(self.seam_step)) if self.seam_step else float("nan"),
        }

    def line(self) -> str:
        s = self.summary()
        lat, late = s["latency_ms"], s["tick_lateness_ms"]
        dropped = sum(s["chunks_dropped"].values())
        return (
            f"ticks={s['ticks']} acted={s['acted']} starved={s['starved']} holds={s['holds']} "
            f"held_ticks={s['held_ticks']} | latency ms p50={lat['p50']:.1f} p95={lat['p95']:.1f} "
            f"max={lat['max']:.1f} (server inference p50={s['server_inference_ms_p50']:.1f}) | "
            f"jitter ms p50={late['p50']:.2f} p99={late['p99']:.2f} max={late['max']:.2f} "
            f"skipped={s['skipped_ticks']} | chunks={s['chunks_accepted']} dropped={dropped} "
            f"server_drops={s['server_drops']} "
            f"overlap rows mean={s['overlap_rows_mean']:.1f} disagreement max={s['overlap_disagreement_max']:.3f} "
            f"seam step max={s['seam_step_max']:.3f} | "
            f"failures={sum(s['failures'].values())}"
            + (" | safety " + " ".join(f"{k}={v}" for k, v in sorted(s["safety"].items())) if s["safety"] else "")
        )
