"""Per-run measures as the FastServe paper reports them."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class JobRecord:
    job_id: str
    arrival: float
    first_token: float
    finish: float
    input_len: int
    output_len: int
    join_queue: int

    @property
    def jct(self) -> float:
        return self.finish - self.arrival

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival


def summarize(records: list[JobRecord], stats: dict[str, int], num_queues: int) -> dict:
    assert records, "no finished jobs to summarize"
    jct = np.array([r.jct for r in records])
    ttft = np.array([r.ttft for r in records])
    norm = jct / np.array([r.output_len for r in records])
    span = max(r.finish for r in records) - min(r.arrival for r in records)
    hist = [0] * num_queues
    for r in records:
        hist[r.join_queue] += 1
    tokens = sum(r.output_len for r in records)
    return {
        "num_jobs": len(records),
        "mean_norm_latency": float(norm.mean()),
        "p95_norm_latency": float(np.percentile(norm, 95)),
        "mean_jct": float(jct.mean()),
        "p50_jct": float(np.percentile(jct, 50)),
        "p99_jct": float(np.percentile(jct, 99)),
        "mean_ttft": float(ttft.mean()),
        "p99_ttft": float(np.percentile(ttft, 99)),
        "throughput": len(records) / span if span > 0 else float("inf"),
        "token_throughput": tokens / span if span > 0 else float("inf"),
        "preemptions": stats["preemptions"],
        "demotions": stats["demotions"],
        "promotions": stats["promotions"],
        "swaps": stats["swaps"],
        "drops": stats["drops"],
        "queue_join_histogram": hist,
    }
