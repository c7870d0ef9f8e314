"""What the scheduler service reports about itself: its per-iteration control
overhead (in its heartbeat) and its queue and KV usage (`SchedulerStats`)."""
from __future__ import annotations

import time
from dataclasses import dataclass

from fastserve.common.schemas import SchedulerStats


@dataclass
class LoopTimes:
    """Per-iteration control overhead: the wall time between consecutive
    results of back-to-back iterations (no idle wait between them) minus the
    engine's own step time. Zero would mean the worker never waits for the
    scheduler or the bus."""

    iterations: int = 0
    step_seconds: float = 0.0  # sum of the worker's step() times
    round_trip_seconds: float = 0.0  # send -> result received, summed
    back_to_back: int = 0
    wall_seconds: float = 0.0  # result(i-1) -> result(i) gaps, back-to-back only
    step_in_back_to_back: float = 0.0

    def record(self, sent: float, received: float, last_received: float | None, step: float) -> None:
        self.iterations += 1
        self.step_seconds += step
        self.round_trip_seconds += received - sent
        if last_received is not None:
            self.back_to_back += 1
            self.wall_seconds += received - last_received
            self.step_in_back_to_back += step

    def summary(self) -> dict:
        n = max(self.back_to_back, 1)
        return {
            "iterations": self.iterations,
            "mean_step_ms": 1e3 * self.step_seconds / max(self.iterations, 1),
            "mean_round_trip_ms": 1e3 * self.round_trip_seconds / max(self.iterations, 1),
            "mean_iteration_ms": 1e3 * self.wall_seconds / n,
            "mean_control_overhead_ms": 1e3 * (self.wall_seconds - self.step_in_back_to_back) / n,
        }


def stats_message(config, core, num_gpu_blocks: int) -> SchedulerStats:
    """`config` is the SchedulerServiceConfig, `core` the SchedulerCore."""
    gpu_total = max(num_gpu_blocks, 1)
    host_total = max(config.host_kv_blocks, 1)
    return SchedulerStats(
        instance_id=config.instance_id, ts=time.time(), model=config.model,
        queue_lengths=list(core.queue_lengths()), num_running=core.num_running,
        num_waiting=core.num_waiting, num_swapped=core.num_swapped,
        gpu_kv_usage=core.gpu_blocks_used() / gpu_total,
        cpu_kv_usage=core.host_blocks_used() / host_total if config.host_kv_blocks else 0.0,
        num_preemptions=_stat(core.stats, "preemptions"), max_queued_jobs=config.max_queued_jobs)


def _stat(stats, name: str) -> int:
    if isinstance(stats, dict):
        return int(stats.get(name, 0))
    return int(getattr(stats, name, 0))
