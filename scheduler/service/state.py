"""The synchronous half of the scheduler service: what bus messages and batch
results change in the core and the job table, applied at an iteration boundary.

Nothing here awaits, so no bus message can interleave with a state change;
the service only collects messages in its inbox and hands them over here.
What it produces is (reply queue, `TokenEvent`) pairs for the service to send.
"""
from __future__ import annotations

import time
from collections import OrderedDict

import structlog

from fastserve.common.schemas import BatchResult, JobSubmit, KVCopyDone, TokenEvent
from fastserve.scheduler.service.job_table import Job, JobTable
from fastserve.scheduler.core.types import IterationResult

log = structlog.get_logger("fastserve.scheduler")

# Cancels remembered, so a job cancelled before it arrived (or redelivered) is dropped.
_RECENT_CANCELS = 10000


class ServiceState:
    """Applies jobs, cancels, copy reports and batch results; collects the events they cause."""

    def __init__(self, core, jobs: JobTable, instance_id: str):
        self.core = core
        self.jobs = jobs
        self.instance_id = instance_id
        self._recent_cancels: OrderedDict[str, None] = OrderedDict()
        self._events: list[tuple[str, TokenEvent]] = []  # errors found outside a result

    def apply_inbox(self, inbox: list[tuple[str, object]], now: float) -> None:
        """The bus messages received since the last iteration boundary, in order."""
        for kind, msg in inbox:
            if kind == "submit":
                self.submit(msg, now)
            elif kind == "cancel":
                self.cancel(msg.job_id, reason=msg.reason or "cancelled")
            elif kind == "copy_done":
                self.copy_done(msg, now)

    def submit(self, msg: JobSubmit, now: float) -> None:
        if msg.job_id in self._recent_cancels or msg.job_id in self.jobs:
            return  # cancelled before it arrived, or a redelivery: idempotent
        job, error = self.jobs.admit(msg, now)
        log.debug("job received", job_id=msg.job_id, trace_id=msg.trace_id,
                 prompt_tokens=len(msg.prompt_token_ids), error=error)
        if error is not None:
            self._events.append((msg.reply_to, TokenEvent(
                job_id=msg.job_id, trace_id=msg.trace_id, token_ids=[], error=error,
                num_prompt_tokens=len(msg.prompt_token_ids), scheduler_id=self.instance_id)))
            return
        try:
            self.core.add_job(job.spec, now)
        except ValueError as exc:
            self.jobs.forget(msg.job_id)
            self._events.append((msg.reply_to, job.event([], error=str(exc))))

    def cancel(self, job_id: str, reason: str) -> None:
        self._recent_cancels[job_id] = None
        while len(self._recent_cancels) > _RECENT_CANCELS:
            self._recent_cancels.popitem(last=False)
        job = self.jobs.get(job_id)
        if job is None:
            return
        log.debug("job cancelled", job_id=job_id, trace_id=job.trace_id, reason=reason)
        # The core keeps blocks that an outstanding copy still writes until copy_done.
        self.core.cancel(job_id)
        self.jobs.forget(job_id)

    def copy_done(self, msg: KVCopyDone, now: float) -> None:
        # Also for jobs cancelled meanwhile: the core frees their blocks only now.
        try:
            self.core.copy_done(msg.job_id, msg.direction, now)
        except ValueError as exc:
            log.error("copy report the core does not expect", job_id=msg.job_id, error=str(exc))
        job = self.jobs.get(msg.job_id)
        if msg.error:
            log.error("KV copy failed", job_id=msg.job_id, direction=msg.direction, error=msg.error)
            if job is not None:
                self.fail(job, f"KV {msg.direction} failed: {msg.error}")

    def fail(self, job: Job, error: str) -> None:
        self._events.append((job.reply_to, job.event([], error=error)))
        self.core.cancel(job.job_id)
        self.jobs.forget(job.job_id)

    def apply_result(self, decision, result: BatchResult) -> list[tuple[str, TokenEvent]]:
        """Apply one batch's result; the token events to send, in order."""
        now = time.monotonic()
        events, finished = [], []
        if result.error:
            log.error("batch failed", iteration=decision.iteration, error=result.error)
            self.core.update(IterationResult(decision.iteration, result.step_seconds, []), now)
            for entry in decision.batch:
                job = self.jobs.get(entry.job_id)
                if job is not None:
                    self.fail(job, f"worker error: {result.error}")
            return self.take_events()
        by_id = {r[0]: r for r in result.results}
        for entry in decision.batch:
            job = self.jobs.get(entry.job_id)
            r = by_id.get(entry.job_id)
            if job is None or r is None:
                continue  # a non-final prefill chunk samples nothing
            reason = job.append(int(r[1]))
            events.append((job.reply_to, job.event([int(r[1])], logprob=float(r[2]), top=r[3],
                                                   finish_reason=reason, prompt_logprobs=r[4] if len(r) > 4 else None)))
            if reason is not None:
                finished.append(job.job_id)
                log.debug("job finished", job_id=job.job_id, trace_id=job.trace_id, reason=reason,
                         generated=len(job.generated))
        self.core.update(IterationResult(decision.iteration, result.step_seconds, finished), now)
        for job_id in finished:
            self.jobs.forget(job_id)
        return self.take_events() + events

    def take_events(self) -> list[tuple[str, TokenEvent]]:
        """Events (errors) produced outside a batch result since the last call."""
        ev, self._events = self._events, []
        return ev
