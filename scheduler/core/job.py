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
                 "join_level", "cancelled", "reserved", "move_id", "num_scheduled", "pending_samples",
                 "last_iteration")

    def __init__(self, spec: JobSpec, level: int, now: float) -> None:
        self.spec = spec
        self.level = level
        self.join_level = level
        self.key: tuple[int, ...] = ()
        self.seq = 0
        self.charge = 0.0  # service received in the current level (seconds)
        self.num_computed = 0  # tokens in the KV cache (iterations whose result is back)
        self.num_generated = 0  # tokens sampled (results back)
        # Iterations in flight: the tokens they were given and how many will
        # sample. The next iteration may start where they end, before their
        # results are back (the worker feeds the job its own sampled token).
        self.num_scheduled = 0
        self.pending_samples = 0
        self.last_iteration = -1
        self.gpu_blocks: list[int] = []
        self.host_blocks = 0  # blocks it holds in the KV store's host pool
        self.move_id: int | None = None  # its KV move in flight
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
        """Prompt plus generated tokens, those still in flight included: what
        the KV must eventually hold."""
        return self.spec.input_len + self.num_generated + self.pending_samples

    @property
    def can_sample_more(self) -> bool:
        """False once the iterations in flight reach max_tokens: another one
        would compute a token past the end."""
        return self.num_generated + self.pending_samples < self.spec.max_tokens

    @property
    def remaining_tokens(self) -> int:
        target = self.spec.output_len if self.spec.output_len is not None else self.spec.max_tokens
        return max(target - self.num_generated, 0)

    def __repr__(self) -> str:
        return (f"Job({self.id}, L{self.level}, loc={self.loc.value}, computed={self.num_computed}, "
                f"gen={self.num_generated}, charge={self.charge:.4f})")
