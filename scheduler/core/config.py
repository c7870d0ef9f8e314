"""Configuration of the scheduler core, validated when built. The settings a
user can set (flags, environment) come from common/settings.py; the rest are
the core's own tuning constants."""
from __future__ import annotations

from dataclasses import dataclass

from fastserve.common import settings as S


@dataclass
class SchedulerCoreConfig:
    policy: str = S.POLICY()
    max_batch_size: int = S.MAX_BATCH_SIZE()
    max_tokens_per_batch: int = S.MAX_TOKENS_PER_BATCH()
    block_size: int = S.BLOCK_SIZE()
    num_gpu_blocks: int = 4096  # the worker says how many it has
    num_host_blocks: int = 16384  # the KV store says how many it has
    max_model_len: int = 2048  # the model says (common/model_config.py)
    num_queues: int = S.NUM_QUEUES()
    quantum_ratio: float = S.QUANTUM_RATIO()
    # Q0's quantum; None: one decode iteration at `typical_batch` jobs of
    # `typical_context` tokens, from the cost model (DESIGN.md).
    base_quantum: float | None = S.BASE_QUANTUM()
    typical_batch: int = 8
    typical_context: int = 512
    # Seconds without running after which a job is promoted to Q0; None:
    # starvation_slo_factor x the SLO (SLO = slo_factor x base quantum).
    starvation_threshold: float | None = S.STARVATION_THRESHOLD()
    slo_factor: float = 10.0
    starvation_slo_factor: float = 50.0
    # Promotions are capped per iteration: promoting more jobs than can run
    # only reorders Q0, and an uncapped burst would make one schedule() O(jobs).
    max_promotions_per_iteration: int = 16
    # Per iteration, at most this many jobs that cannot run now (blocked on
    # memory, swapped out) are considered, and at most this many offload and
    # upload candidates are ranked by ENST: bounds schedule() under memory pressure.
    max_candidates: int = 64
    # A job with an iteration in flight may be scheduled again this many
    # iterations after it last was: 1 on one worker (it runs in consecutive
    # iterations, fed its own sampled token), P on a pipeline of P stages (its
    # token must come back from the last stage before the first runs it again).
    reschedule_gap: int = 1

    def __post_init__(self) -> None:
        if self.policy not in S.POLICIES:
            raise ValueError(f"unknown scheduling policy {self.policy!r}; choose one of {', '.join(S.POLICIES)}")
        S.validate(self)
        for name in ("num_gpu_blocks", "max_model_len", "typical_batch", "max_promotions_per_iteration",
                     "max_candidates", "reschedule_gap"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_host_blocks < 0:
            raise ValueError(f"num_host_blocks must be >= 0, got {self.num_host_blocks}")
