"""The scheduler service's per-job state beside the core: tokens, sampling
params, and what the worker already holds, so that each `BatchCommand`
carries only deltas for running jobs and full data only for new ones.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastserve.common.schemas import BatchCommand, JobSubmit, TokenEvent
from fastserve.common.sampling_params import SamplingParams
from fastserve.scheduler.core.types import JobSpec


@dataclass
class WorkerInfo:
    """What the scheduler learns from its worker's heartbeat."""

    num_gpu_blocks: int
    block_size: int
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    last_seen: float = 0.0

    @classmethod
    def from_info(cls, info: dict) -> "WorkerInfo":
        return cls(int(info["num_gpu_blocks"]), int(info["block_size"]), int(info["max_model_len"]),
                   int(info["vocab_size"]), tuple(info.get("eos_token_ids") or ()))


@dataclass
class Job:
    job_id: str
    trace_id: str
    reply_to: str
    prompt: list[int]
    sampling: SamplingParams
    sampling_dict: dict
    spec: JobSpec
    received_wall: float
    arrival_wall: float
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    scheduler_id: str
    generated: list[int] = field(default_factory=list)
    on_worker: bool = False  # the worker holds its tokens and sampling params
    sent_table: list[int] = field(default_factory=list)  # block table the worker holds
    moved: bool = False  # the KV store has a record of it
    first_scheduled_wall: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.generated)

    def append(self, token_id: int) -> str | None:
        """Record a sampled token; return the finish reason, if it ends the job."""
        self.generated.append(token_id)
        reason = self.sampling.finish_reason(token_id, len(self.generated), self.eos_token_ids)
        if reason is None and self.num_tokens >= self.max_model_len:
            reason = "length"
        return reason

    def event(self, token_ids: list[int], *, logprob: float | None = None, top=None,
              finish_reason: str | None = None, error: str | None = None, prompt_logprobs=None) -> TokenEvent:
        want = self.sampling.logprobs
        first = token_ids and len(self.generated) == len(token_ids)
        queue_time = None
        if first and self.first_scheduled_wall is not None:
            queue_time = max(0.0, self.first_scheduled_wall - self.arrival_wall)
        return TokenEvent(
            job_id=self.job_id, trace_id=self.trace_id, token_ids=token_ids,
            logprobs=[logprob] * len(token_ids) if want is not None and logprob is not None else None,
            top_logprobs=[[[int(t), float(v)] for t, v in top]] if want and top else None,
            finish_reason=finish_reason, error=error, num_prompt_tokens=len(self.prompt),
            num_generated=len(self.generated), queue_time=queue_time, scheduler_id=self.scheduler_id,
            prompt_logprobs=prompt_logprobs)


class JobTable:
    """Per-job state the service keeps beside the core: tokens, sampling
    params, what the worker already holds (so commands carry only deltas)."""

    def __init__(self, worker: WorkerInfo, num_gpu_blocks: int, scheduler_id: str):
        self.worker = worker
        self.num_gpu_blocks = num_gpu_blocks
        self.scheduler_id = scheduler_id
        self._jobs: dict[str, Job] = {}
        self._worker_free: list[str] = []
        self._kv_free: list[str] = []

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._jobs

    def __getitem__(self, job_id: str) -> Job:
        return self._jobs[job_id]

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def num_unfinished(self) -> int:
        return len(self._jobs)

    def admit(self, msg: JobSubmit, now: float) -> tuple[Job | None, str | None]:
        """A Job, or the reason it can never run (sent back to the gateway as an error)."""
        w = self.worker
        try:
            sampling = SamplingParams.from_dict(msg.sampling)
        except (TypeError, ValueError) as exc:
            return None, f"invalid sampling parameters: {exc}"
        n = len(msg.prompt_token_ids)
        bad = [t for t in msg.prompt_token_ids if not 0 <= t < w.vocab_size]
        if bad:
            return None, f"prompt token ids out of range [0, {w.vocab_size}): {bad[:5]}"
        if n + sampling.max_tokens > w.max_model_len:
            return None, (f"prompt ({n} tokens) + max_tokens ({sampling.max_tokens}) exceeds the "
                          f"model's context length ({w.max_model_len})")
        need = -(-min(n + sampling.max_tokens, w.max_model_len) // w.block_size)
        if need > self.num_gpu_blocks:
            return None, (f"the job needs up to {need} KV blocks but the GPU pool has only "
                          f"{self.num_gpu_blocks}; lower max_tokens or raise --gpu-kv-blocks")
        spec = JobSpec(job_id=msg.job_id, arrival_time=now, input_len=n, max_tokens=sampling.max_tokens)
        job = Job(msg.job_id, msg.trace_id, msg.reply_to, list(msg.prompt_token_ids), sampling,
                  sampling.to_dict(), spec, time.time(), msg.arrival_time, w.max_model_len,
                  w.eos_token_ids, self.scheduler_id)
        self._jobs[job.job_id] = job
        return job, None

    def forget(self, job_id: str) -> None:
        job = self._jobs.pop(job_id, None)
        if job is None:
            return
        if job.on_worker:
            self._worker_free.append(job_id)
        if job.moved:
            self._kv_free.append(job_id)

    def mark_moved(self, job_id: str) -> None:
        job = self._jobs.get(job_id)
        if job is not None:
            job.moved = True

    def has_worker_free(self) -> bool:
        return bool(self._worker_free)

    def take_worker_free(self) -> list[str]:
        free, self._worker_free = self._worker_free, []
        return free

    def take_kv_free(self) -> list[str]:
        free, self._kv_free = self._kv_free, []
        return free

    def command(self, replica: str, decision) -> BatchCommand:
        new, run = [], []
        for e in decision.batch:
            job = self._jobs[e.job_id]
            if job.first_scheduled_wall is None:
                job.first_scheduled_wall = time.time()
            if not job.on_worker:
                new.append([job.job_id, job.prompt + job.generated, job.sampling_dict, job.trace_id])
                job.on_worker, job.sent_table = True, []
            end = e.num_computed + e.num_new_tokens
            assert end <= job.num_tokens, (e, job.num_tokens)
            table = list(e.block_table)
            k = len(job.sent_table)
            if table[:k] == job.sent_table:
                append, full = table[k:], None
            else:  # moved (upload) or rebuilt (recompute): resend it whole
                append, full = [], table
            job.sent_table = table
            assert e.sample == (end == job.num_tokens), (e, job.num_tokens)
            run.append([e.job_id, e.num_computed, e.num_new_tokens, e.sample, append, full])
        return BatchCommand(replica=replica, iteration=decision.iteration, new=new, run=run,
                            free=self.take_worker_free(),
                            sent_at=time.time())
