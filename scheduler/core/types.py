"""Plain dataclasses exchanged between the scheduler core and whoever drives it
(the scheduler service, the simulator, the benchmark). No behaviour beyond
validation: the core owns the state, these only describe it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Direction = Literal["offload", "upload"]


@dataclass(frozen=True)
class JobSpec:
    job_id: str
    arrival_time: float
    input_len: int
    max_tokens: int
    # Only the srpt oracle and the simulator know the real output length.
    output_len: int | None = None
    # 0: interactive; > 0: batch work, which runs only on capacity the interactive jobs leave.
    priority: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.job_id, str) or not self.job_id:
            raise ValueError(f"job_id must be a non-empty string, got {self.job_id!r}")
        if self.input_len < 1:
            raise ValueError(f"job {self.job_id}: input_len must be >= 1, got {self.input_len}")
        if self.max_tokens < 1:
            raise ValueError(f"job {self.job_id}: max_tokens must be >= 1, got {self.max_tokens}")
        if self.output_len is not None and self.output_len < 1:
            raise ValueError(f"job {self.job_id}: output_len must be >= 1, got {self.output_len}")
        if self.arrival_time < 0:
            raise ValueError(f"job {self.job_id}: arrival_time must be >= 0, got {self.arrival_time}")


@dataclass
class BatchEntry:
    job_id: str
    # True while the prompt (or, after `recompute`, prompt + generated tokens)
    # is being written into the KV cache.
    is_prefill: bool
    num_new_tokens: int
    # Tokens already in the KV cache = position of the first new token.
    num_computed: int
    # GPU block ids covering num_computed + num_new_tokens tokens.
    block_table: list[int]
    # False for a non-final chunk of a chunked prefill: no token comes out.
    sample: bool = True


@dataclass
class KVMove:
    """Move one job's KV: offload its `gpu_blocks` to the host, or upload it
    into `gpu_blocks` (newly allocated). The KV store picks the host blocks."""

    move_id: int
    job_id: str
    direction: Direction
    gpu_blocks: list[int]

    def __post_init__(self) -> None:
        assert self.direction in ("offload", "upload"), self.direction


@dataclass
class ScheduleDecision:
    iteration: int
    batch: list[BatchEntry]
    offloads: list[KVMove] = field(default_factory=list)
    uploads: list[KVMove] = field(default_factory=list)  # most urgent first
    # Jobs whose KV was freed to be recomputed later (their GPU blocks are free now).
    dropped: list[str] = field(default_factory=list)
    # Jobs that ran in the previous iteration and do not run in this one.
    preempted: list[str] = field(default_factory=list)


@dataclass
class IterationResult:
    iteration: int
    # Seconds the iteration took (the charge every participating job pays).
    elapsed: float
    # Jobs whose last token came out of this iteration (decided by the caller).
    finished: list[str] = field(default_factory=list)
