"""The scheduler core's private per-job state."""
from __future__ import annotations

from enum import Enum

from fastserve.scheduler.core.types import JobSpec


class Loc(Enum):
    NONE = "none"  # no KV anywhere: never run, or dropped for recompute
    GPU = "gpu"
    HOST = "host"
    TO_HOST = "to_host"  # offload in flight: GPU blocks still held
    TO_GPU = "to_gpu"  # upload in flight: host blocks still held


class Job:
    __slots__ = ("spec", "level", "key", "seq", "charge", "num_computed", "num_generated",
                 "gpu_blocks", "host_blocks", "loc", "started", "in_flight", "starve_clock",
                 "join_level", "cancelled", "reserved")

    def __init__(self, spec: JobSpec, level: int, now: float) -> None:
        self.spec = spec
        self.level = level
        self.join_level = level
        self.key: tuple[int, ...] = ()
        self.seq = 0
        self.charge = 0.0  # service received in the current level (seconds)
        self.num_computed = 0  # tokens in the KV cache
        self.num_generated = 0
        self.gpu_blocks: list[int] = []
        self.host_blocks: list[int] = []
        self.loc = Loc.NONE
        self.started = False  # in its level's started list (else in the fresh heap)
        self.in_flight = 0  # number of outstanding iterations it takes part in
        self.starve_clock = now  # last time it ran or was promoted
        self.cancelled = False  # cancelled while blocks were busy: freed when they settle
        self.reserved = 0  # blocks reserved for the whole output (kv policy "none")

    @property
    def id(self) -> str:
        return self.spec.job_id

    @property
    def known_tokens(self) -> int:
        """Prompt plus generated tokens: what the KV must eventually hold."""
        return self.spec.input_len + self.num_generated

    @property
    def remaining_tokens(self) -> int:
        target = self.spec.output_len if self.spec.output_len is not None else self.spec.max_tokens
        return max(target - self.num_generated, 0)

    def __repr__(self) -> str:
        return (f"Job({self.id}, L{self.level}, loc={self.loc.value}, computed={self.num_computed}, "
                f"gen={self.num_generated}, charge={self.charge:.4f})")
