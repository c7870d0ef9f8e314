"""Configuration of the scheduler core, validated when built."""
from __future__ import annotations

from dataclasses import dataclass

from fastserve.scheduler.core.policies import POLICY_NAMES


@dataclass
class SchedulerCoreConfig:
    policy: str = "default"
    max_batch_size: int = 32
    max_tokens_per_batch: int = 2048
    block_size: int = 16
    num_gpu_blocks: int = 4096
    num_host_blocks: int = 16384
    max_model_len: int = 2048
    num_queues: int = 10
    quantum_ratio: float = 2.0
    # Q0's quantum; None: one decode iteration at `typical_batch` jobs of
    # `typical_context` tokens, from the cost model (DESIGN.md).
    base_quantum: float | None = None
    typical_batch: int = 8
    typical_context: int = 512
    # Seconds without running after which a job is promoted to Q0; None:
    # starvation_slo_factor x the SLO (SLO = slo_factor x base quantum).
    starvation_threshold: float | None = None
    slo_factor: float = 10.0
    starvation_slo_factor: float = 50.0
    # Promotions are capped per iteration: promoting more jobs than can run
    # only reorders Q0, and an uncapped burst would make one schedule() O(jobs).
    max_promotions_per_iteration: int = 16
    # Per iteration, at most this many jobs that cannot run now (blocked on
    # memory, swapped out) are considered, and at most this many offload and
    # upload candidates are ranked by ENST: bounds schedule() under memory pressure.
    max_candidates: int = 64

    def __post_init__(self) -> None:
        if self.policy not in POLICY_NAMES:
            raise ValueError(f"unknown scheduling policy {self.policy!r}; choose one of {', '.join(POLICY_NAMES)}")
        for name in ("max_batch_size", "max_tokens_per_batch", "block_size", "num_gpu_blocks",
                     "max_model_len", "num_queues", "typical_batch", "max_promotions_per_iteration", "max_candidates"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_host_blocks < 0:
            raise ValueError(f"num_host_blocks must be >= 0, got {self.num_host_blocks}")
        if self.quantum_ratio < 1:
            raise ValueError(f"quantum_ratio must be >= 1, got {self.quantum_ratio}")
        if self.base_quantum is not None and self.base_quantum <= 0:
            raise ValueError(f"base_quantum must be > 0, got {self.base_quantum}")
        if self.starvation_threshold is not None and self.starvation_threshold <= 0:
            raise ValueError(f"starvation_threshold must be > 0, got {self.starvation_threshold}")
