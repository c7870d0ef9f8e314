"""The scheduler service's per-job state beside the core: tokens, sampling
parameters, where its events go, and what the worker already holds, so that
each `BatchCommand` carries only deltas for running jobs and full data only
for new ones.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastserve.common.sampling_params import SamplingParams
from fastserve.common.schemas import (
    BatchCommand, JobSubmit, NewJob, PromptLogprob, RunEntry, TokenEvent, TopLogprob, WorkerInfo,
)
from fastserve.scheduler.core.types import JobSpec


@dataclass
class Job:
    job_id: str
    trace_id: str
    reply_to: str
    prompt: list[int]  # as submitted: the prompt, then `num_generated_before` continued tokens
    sampling: SamplingParams
    spec: JobSpec
    arrival_wall: float
    num_generated_before: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    deadline: float | None = None
    generated: list[int] = field(default_factory=list)  # this scheduler's output
    on_worker: bool = False  # the worker holds its tokens and sampling params
    sent_table: list[int] = field(default_factory=list)  # block table the worker holds
    on_kvstore: bool = False  # the KV store may hold a host copy
    first_scheduled_wall: float | None = None
    announced: bool = False  # the gateway knows this scheduler holds it

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.generated)

    @property
    def num_generated(self) -> int:
        """Output tokens so far, those of an earlier scheduler included."""
        return self.num_generated_before + len(self.generated)

    def append(self, token_id: int) -> str | None:
        """Record a sampled token; return the finish reason, if it ends the job."""
        self.generated.append(token_id)
        reason = self.sampling.finish_reason(token_id, self.num_generated, self.eos_token_ids)
        if reason is None and self.num_tokens >= self.max_model_len:
            reason = "length"
        return reason

    def event(self, token_ids: list[int], *, logprob: float | None = None, top: list[TopLogprob] | None = None,
              finish_reason: str | None = None, error: str | None = None,
              prompt_logprobs: list[PromptLogprob] | None = None) -> TokenEvent:
        want = self.sampling.logprobs
        first = token_ids and len(self.generated) == len(token_ids)
        queue_time = None
        if first and self.first_scheduled_wall is not None:
            queue_time = max(0.0, self.first_scheduled_wall - self.arrival_wall)
        self.announced = True
        return TokenEvent(
            job_id=self.job_id, token_ids=token_ids,
            logprobs=[logprob] * len(token_ids) if want is not None and logprob is not None else None,
            top_logprobs=[top] if want and top else None,
            finish_reason=finish_reason, error=error, num_prompt_tokens=len(self.prompt) - self.num_generated_before,
            num_generated=self.num_generated, queue_time=queue_time, prompt_logprobs=prompt_logprobs)


class JobTable:
    """Per-job state the service keeps beside the core."""

    def __init__(self, scheduler_id: str):
        self.scheduler_id = scheduler_id
        self.worker: WorkerInfo | None = None
        self.num_gpu_blocks = 0
        self._jobs: dict[str, Job] = {}
        self._worker_free: list[str] = []
        self._kv_free: list[str] = []

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._jobs

    def __iter__(self):
        return iter(self._jobs.values())

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def num_unfinished(self) -> int:
        return len(self._jobs)

    def ids(self) -> list[str]:
        return list(self._jobs)

    def set_worker(self, worker: WorkerInfo, num_gpu_blocks: int) -> None:
        self.worker = worker
        self.num_gpu_blocks = num_gpu_blocks

    def admit(self, msg: JobSubmit, now: float) -> tuple[Job | None, str | None]:
        """A Job, or the reason it can never run (sent back to the gateway as an error)."""
        w = self.worker
        sampling = msg.sampling
        n = len(msg.prompt_token_ids)
        bad = [t for t in msg.prompt_token_ids if not 0 <= t < w.vocab_size]
        if bad:
            return None, f"prompt token ids out of range [0, {w.vocab_size}): {bad[:5]}"
        if sampling.top_k > w.vocab_size:
            return None, f"top_k ({sampling.top_k}) exceeds the vocabulary size ({w.vocab_size})"
        remaining = sampling.max_tokens - msg.num_generated
        if remaining < 1:
            return None, f"num_generated ({msg.num_generated}) leaves no tokens of max_tokens ({sampling.max_tokens})"
        if n + remaining > w.max_model_len:
            return None, (f"prompt ({n} tokens) + max_tokens ({remaining}) exceeds the "
                          f"model's context length ({w.max_model_len})")
        need = -(-(n + remaining) // w.block_size)
        if need > self.num_gpu_blocks:
            return None, (f"the job needs up to {need} KV blocks but the GPU pool has only "
                          f"{self.num_gpu_blocks}; lower max_tokens or raise --gpu-kv-blocks")
        spec = JobSpec(job_id=msg.job_id, arrival_time=now, input_len=n, max_tokens=remaining, priority=msg.priority)
        job = Job(msg.job_id, msg.trace_id, msg.reply_to, list(msg.prompt_token_ids), sampling, spec,
                  msg.arrival_time, msg.num_generated, w.max_model_len, tuple(w.eos_token_ids), msg.deadline)
        self._jobs[job.job_id] = job
        return job, None

    def forget(self, job_id: str) -> Job | None:
        job = self._jobs.pop(job_id, None)
        if job is None:
            return None
        if job.on_worker:
            self._worker_free.append(job_id)
        if job.on_kvstore:
            self._kv_free.append(job_id)
        return job

    def worker_lost(self) -> None:
        """The worker holds nothing any more: every job is new to the next one."""
        self._worker_free.clear()
        for job in self._jobs.values():
            job.on_worker, job.sent_table = False, []

    def kvstore_lost(self) -> None:
        self._kv_free.clear()
        for job in self._jobs.values():
            job.on_kvstore = False

    def mark_moved(self, job_id: str) -> None:
        job = self._jobs.get(job_id)
        if job is not None:
            job.on_kvstore = True

    def has_worker_free(self) -> bool:
        return bool(self._worker_free)

    def take_worker_free(self) -> list[str]:
        free, self._worker_free = self._worker_free, []
        return free

    def take_kv_free(self) -> list[str]:
        free, self._kv_free = self._kv_free, []
        return free

    def command(self, replica: str, epoch: int, decision) -> BatchCommand:
        new, run = [], []
        for e in decision.batch:
            job = self._jobs[e.job_id]
            if job.first_scheduled_wall is None:
                job.first_scheduled_wall = time.time()
            if not job.on_worker:
                new.append(NewJob(job.job_id, job.trace_id, job.prompt + job.generated, job.sampling,
                                  num_generated=job.num_generated))
                job.on_worker, job.sent_table = True, []
            table = e.block_table
            k = len(job.sent_table)
            if table[:k] == job.sent_table:
                entry = RunEntry(e.job_id, e.num_computed, e.num_new_tokens, e.sample, append_blocks=table[k:])
            else:  # moved (upload) or rebuilt (recompute): resend it whole
                entry = RunEntry(e.job_id, e.num_computed, e.num_new_tokens, e.sample, block_table=list(table))
            job.sent_table = list(table)
            run.append(entry)
        return BatchCommand(replica=replica, epoch=epoch, iteration=decision.iteration, new=new, run=run,
                            free=self.take_worker_free(), sent_at=time.time(), scheduler_id=self.scheduler_id)
