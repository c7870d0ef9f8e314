"""The synchronous half of the scheduler service: what bus messages and batch
results change in the core and the job table, applied at an iteration boundary.

Nothing here awaits, so no bus message can interleave with a state change;
the service only collects messages in its inbox and hands them over here.
What it produces are token events, grouped by the gateway they go to.
"""
from __future__ import annotations

import time
from collections import OrderedDict

import structlog

from fastserve.common.schemas import BatchResult, JobSubmit, KVCopyDone, TokenEvent
from fastserve.scheduler.core.types import IterationResult
from fastserve.scheduler.service.job_table import Job, JobTable

log = structlog.get_logger("fastserve.scheduler")

# Ids of jobs that ended (cancelled, finished, failed) remembered, so a job
# cancelled before it arrived, or a submission published twice (its confirm was
# lost in a broker restart), is dropped instead of run again.
_RECENT_ENDED = 10000


class ServiceState:
    """Applies jobs, cancels, copy reports and batch results; collects the events they cause."""

    def __init__(self, core, jobs: JobTable, instance_id: str):
        self.core = core
        self.jobs = jobs
        self.instance_id = instance_id
        self._recent_ended: OrderedDict[str, None] = OrderedDict()
        self._events: dict[str, list[TokenEvent]] = {}  # reply queue -> events, in order

    # ------------------------------------------------------------------ jobs
    def submit(self, msg: JobSubmit, now: float) -> None:
        if msg.job_id in self._recent_ended or msg.job_id in self.jobs:
            return  # cancelled before it arrived, or a redelivery: idempotent
        job, error = self.jobs.admit(msg, now)
        log.debug("job received", job_id=msg.job_id, trace_id=msg.trace_id,
                 prompt_tokens=len(msg.prompt_token_ids), continued=msg.num_generated, error=error)
        if error is not None:
            self._emit(msg.reply_to, TokenEvent(job_id=msg.job_id, token_ids=[], error=error,
                                                num_prompt_tokens=msg.prompt_len))
            return
        try:
            self.core.add_job(job.spec, now)
        except ValueError as exc:
            self.jobs.forget(msg.job_id)
            self._emit(job.reply_to, job.event([], error=str(exc)))
            return
        # Tell the gateway at once who holds the job: if this scheduler dies
        # before the first token, the gateway knows to resubmit it.
        self._emit(job.reply_to, job.event([]))

    def _ended(self, job_id: str) -> None:
        self._recent_ended[job_id] = None
        while len(self._recent_ended) > _RECENT_ENDED:
            self._recent_ended.popitem(last=False)

    def cancel(self, job_id: str, reason: str) -> None:
        self._ended(job_id)
        job = self.jobs.get(job_id)
        if job is None:
            return
        log.debug("job cancelled", job_id=job_id, trace_id=job.trace_id, reason=reason)
        # The core keeps blocks that an outstanding iteration or copy still uses until they settle.
        self.core.cancel(job_id)
        self.jobs.forget(job_id)

    def fail(self, job: Job, error: str) -> None:
        log.error("job failed", job_id=job.job_id, trace_id=job.trace_id, error=error)
        self._emit(job.reply_to, job.event([], error=error))
        self.core.cancel(job.job_id)
        self.jobs.forget(job.job_id)
        self._ended(job.job_id)

    def fail_all(self, error: str) -> None:
        for job in list(self.jobs):
            self.fail(job, error)

    def expire(self, wall_now: float) -> None:
        """Jobs past their deadline: nobody waits for them any more."""
        for job in [j for j in self.jobs if j.deadline is not None and j.deadline < wall_now]:
            self.fail(job, "the request's deadline passed before it finished")

    def gateway_gone(self, reply_to: str) -> None:
        """Nobody reads these jobs' tokens any more."""
        for job in [j for j in self.jobs if j.reply_to == reply_to]:
            self.cancel(job.job_id, reason="reply queue gone")

    # ------------------------------------------------------------------ KV
    def copy_done(self, msg: KVCopyDone, now: float) -> None:
        # Also for jobs cancelled meanwhile: the core frees their blocks only now.
        applied = self.core.copy_done(msg.job_id, msg.move_id, now, ok=msg.error is None)
        if msg.error is not None:
            log.warning("KV move failed", job_id=msg.job_id, direction=msg.direction, error=msg.error,
                        applied=applied, then="kept on the GPU" if msg.direction == "offload" else "recompute")
        elif not applied:
            log.info("stale KV copy report", job_id=msg.job_id, move_id=msg.move_id)

    # ------------------------------------------------------------------ results
    def apply_result(self, decision, result: BatchResult) -> None:
        """Apply one batch's result: record tokens, decide which jobs finished,
        queue their events. Tokens of jobs that already finished (computed past
        the end while the result that ended them was on its way) are dropped."""
        now = time.monotonic()
        if result.error:
            # The worker survived but the step failed as a whole: its jobs fail.
            log.error("batch failed", iteration=decision.iteration, error=result.error)
            self.core.update(IterationResult(decision.iteration, result.step_seconds, []), now)
            for entry in decision.batch:
                job = self.jobs.get(entry.job_id)
                if job is not None:
                    self.fail(job, f"worker error: {result.error}")
            return
        finished, failed = [], []
        for r in result.tokens:
            job = self.jobs.get(r.job_id)
            if job is None:
                continue  # finished or cancelled meanwhile: a token past the end
            if r.error is not None:
                failed.append((job, r.error))
                continue
            reason = job.append(r.token_id)
            self._emit(job.reply_to, job.event([r.token_id], logprob=r.logprob, top=r.top_logprobs,
                                               finish_reason=reason, prompt_logprobs=r.prompt_logprobs))
            if reason is not None:
                finished.append(job.job_id)
                log.debug("job finished", job_id=job.job_id, trace_id=job.trace_id, reason=reason,
                         generated=len(job.generated))
        self.core.update(IterationResult(decision.iteration, result.step_seconds, finished), now)
        for job_id in finished:
            self.jobs.forget(job_id)
            self._ended(job_id)
        for job, error in failed:
            self.fail(job, f"worker error: {error}")

    # ------------------------------------------------------------------ events
    def _emit(self, reply_to: str, event: TokenEvent) -> None:
        self._events.setdefault(reply_to, []).append(event)

    def take_events(self) -> dict[str, list[TokenEvent]]:
        ev, self._events = self._events, {}
        return ev
