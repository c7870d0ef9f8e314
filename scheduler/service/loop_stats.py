"""What the scheduler service reports about itself: how busy it keeps the
worker (in its heartbeat), its queue and KV usage (`SchedulerStats`), and
the dashboard's picture of its queues, KV and loop (`SchedulerSnapshot`)."""
from __future__ import annotations

import time
from dataclasses import dataclass

from fastserve.common.schemas import LoopTotals, SchedulerSnapshot, SchedulerStats


@dataclass
class LoopTimes:
    """Per-iteration timings seen from the scheduler. Between two consecutive
    results the worker ran one step; the gap minus the step is time the
    worker waited for the scheduler or the bus. busy = steps / gaps, over
    gaps short enough to be back to back (an idle server's gaps say nothing)."""

    iterations: int = 0
    step_seconds: float = 0.0  # sum of the worker's step() times
    round_trip_seconds: float = 0.0  # command sent -> result received, summed
    back_to_back: int = 0
    wall_seconds: float = 0.0  # result(i-1) -> result(i) gaps, back-to-back only
    step_in_back_to_back: float = 0.0
    schedule_seconds: float = 0.0  # the scheduler's own work: schedule(), results, commands
    tokens: int = 0  # tokens the worker sampled
    snapshot_seconds: float = 0.0
    snapshots: int = 0
    _last_received: float | None = None

    def record(self, sent: float, received: float, step: float, tokens: int = 0) -> None:
        self.iterations += 1
        self.tokens += tokens
        self.step_seconds += step
        self.round_trip_seconds += received - sent
        last = self._last_received
        # Back to back: this command was sent before the previous result came
        # back (two in flight), or right after it.
        if last is not None and sent <= last + 0.001:
            self.back_to_back += 1
            self.wall_seconds += received - last
            self.step_in_back_to_back += step
        self._last_received = received

    def summary(self) -> dict:
        n = max(self.back_to_back, 1)
        return {
            "iterations": self.iterations,
            "mean_step_ms": 1e3 * self.step_seconds / max(self.iterations, 1),
            "mean_round_trip_ms": 1e3 * self.round_trip_seconds / max(self.iterations, 1),
            "mean_iteration_ms": 1e3 * self.wall_seconds / n,
            "mean_control_overhead_ms": 1e3 * (self.wall_seconds - self.step_in_back_to_back) / n,
            "worker_busy_fraction": self.step_in_back_to_back / self.wall_seconds if self.wall_seconds else None,
            "mean_schedule_ms": 1e3 * self.schedule_seconds / max(self.iterations, 1),
        }

    def totals(self) -> LoopTotals:
        return LoopTotals(iterations=self.iterations, tokens=self.tokens, step_seconds=self.step_seconds,
                          schedule_seconds=self.schedule_seconds, round_trip_seconds=self.round_trip_seconds,
                          back_to_back=self.back_to_back, wall_seconds=self.wall_seconds,
                          snapshot_seconds=self.snapshot_seconds, snapshots=self.snapshots)


def stats_message(config, core, jobs, times: LoopTimes) -> SchedulerStats:
    """`config` is the SchedulerServiceConfig, `core` the SchedulerCore, `jobs` the JobTable."""
    gpu_total = max(jobs.num_gpu_blocks, 1)
    host_total = core.kv.host_capacity
    return SchedulerStats(
        instance_id=config.instance_id, ts=time.time(), model=config.served_model_name or "", replica=config.replica,
        queue_lengths=list(core.queue_lengths()), num_running=core.num_running,
        num_waiting=core.num_waiting, num_swapped=core.num_swapped,
        gpu_kv_usage=core.gpu_blocks_used() / gpu_total,
        cpu_kv_usage=core.host_blocks_used() / host_total if host_total else 0.0,
        num_preemptions=core.stats.preemptions, max_queued_jobs=config.max_queued_jobs,
        iterations=times.iterations, step_seconds=times.step_seconds)


def snapshot_message(config, core, times: LoopTimes) -> SchedulerSnapshot:
    """`config` is the SchedulerServiceConfig, `core` the SchedulerCore."""
    return SchedulerSnapshot(
        instance_id=config.instance_id, ts=time.time(), core=core.snapshot(), loop=times.totals(),
        replica=config.replica, model=config.served_model_name or "", policy=config.policy,
        kv_policy=config.kv_policy, max_batch_size=config.max_batch_size)
