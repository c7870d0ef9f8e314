"""The scheduler service: an asyncio shell around `SchedulerCore`.

One per model replica. Every state change happens synchronously at an
iteration boundary: bus handlers only append to an inbox, and the loop applies
the inbox, calls `core.schedule()`, sends one `BatchCommand` to the worker,
waits for its `BatchResult`, decides which jobs finished and calls
`core.update()`. The token events of iteration i are published together with
the command of iteration i+1, so they travel while the worker computes.
`pipeline_depth` > 1 keeps several batches in flight (the core leaves jobs of
outstanding batches out of new ones).
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

import structlog

from fastserve.common import names
from fastserve.common.bus import Bus, UnroutableError
from fastserve.common.schemas import (
    BatchCommand, BatchResult, Heartbeat, JobCancel, JobSubmit, KVCopyDone, KVPlan, SchedulerStats, TokenEvent,
    decode, encode,
)
from fastserve.gpu_worker.sampling import SamplingParams
from fastserve.scheduler.types import IterationResult, JobSpec

log = structlog.get_logger("fastserve.scheduler")


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
              finish_reason: str | None = None, error: str | None = None) -> TokenEvent:
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
            num_generated=len(self.generated), queue_time=queue_time, scheduler_id=self.scheduler_id)


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


def build_core(config: "SchedulerServiceConfig", worker: WorkerInfo):
    """The SchedulerCore for this replica, sized by what the worker has."""
    from fastserve.kvstore.placement import make_kv_policy
    from fastserve.scheduler.config import SchedulerCoreConfig
    from fastserve.scheduler.core import SchedulerCore
    from fastserve.scheduler.cost_model import CostModel

    num_gpu = min(config.gpu_kv_blocks or worker.num_gpu_blocks, worker.num_gpu_blocks)
    cost = CostModel.from_profile(config.profile) if config.profile else CostModel.default(worker.block_size)
    core_cfg = SchedulerCoreConfig(
        policy=config.policy, max_batch_size=config.max_batch_size,
        max_tokens_per_batch=config.max_tokens_per_batch, block_size=worker.block_size,
        num_gpu_blocks=num_gpu, num_host_blocks=config.host_kv_blocks, max_model_len=worker.max_model_len,
        **config.core_options)
    kv_policy = make_kv_policy(config.kv_policy)
    return SchedulerCore(core_cfg, cost, kv_policy), num_gpu


@dataclass
class SchedulerServiceConfig:
    replica: str = "default"
    instance_id: str = ""
    model: str = "fastserve"  # served model name, reported in stats
    policy: str = "sj-mlfq"
    kv_policy: str = "proactive"
    max_batch_size: int = 32
    max_tokens_per_batch: int = 2048
    gpu_kv_blocks: int | None = None  # None: every block the worker has
    host_kv_blocks: int = 0
    profile: str | None = None  # JSON from `fastserve profile`; None: the default cost model
    max_queued_jobs: int = 0  # 0: unlimited; else stop taking jobs from the shared queue
    heartbeat_interval: float = 1.0
    stats_interval: float = 0.5
    result_timeout: float = 600.0  # no batch result this long: the batch failed
    worker_timeout: float = 10.0  # no worker heartbeat this long while a batch runs: the worker is gone
    worker_wait: float = 300.0  # how long start() waits for the worker's first heartbeat
    # Batches in flight at once. 1: schedule -> result -> schedule. More keeps
    # the worker's queue full while results travel (the core leaves jobs of
    # outstanding batches out, so on one stage consecutive batches hold
    # different jobs): for pipelines of several stages, or to hide the bus.
    pipeline_depth: int = 1
    core_options: dict = field(default_factory=dict)  # extra SchedulerCoreConfig fields

    def __post_init__(self) -> None:
        if not self.instance_id:
            self.instance_id = f"scheduler-{self.replica}-{uuid.uuid4().hex[:6]}"
        for name in ("max_batch_size", "max_tokens_per_batch", "heartbeat_interval", "stats_interval",
                     "result_timeout", "worker_timeout", "pipeline_depth"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.gpu_kv_blocks is not None and self.gpu_kv_blocks <= 0:
            raise ValueError(f"gpu_kv_blocks must be > 0, got {self.gpu_kv_blocks}")
        if self.host_kv_blocks < 0 or self.max_queued_jobs < 0:
            raise ValueError("host_kv_blocks and max_queued_jobs must be >= 0")


@dataclass
class LoopTimes:
    """Per-iteration control overhead: the wall time between consecutive
    results of back-to-back iterations (no idle wait between them) minus the
    engine's own step time. Zero would mean the worker never waits for the
    scheduler or the bus."""

    iterations: int = 0
    step_seconds: float = 0.0  # sum of the worker's step() times
    round_trip_seconds: float = 0.0  # send -> result received, summed
    back_to_back: int = 0
    wall_seconds: float = 0.0  # result(i-1) -> result(i) gaps, back-to-back only
    step_in_back_to_back: float = 0.0

    def record(self, sent: float, received: float, last_received: float | None, step: float) -> None:
        self.iterations += 1
        self.step_seconds += step
        self.round_trip_seconds += received - sent
        if last_received is not None:
            self.back_to_back += 1
            self.wall_seconds += received - last_received
            self.step_in_back_to_back += step

    def summary(self) -> dict:
        n = max(self.back_to_back, 1)
        return {
            "iterations": self.iterations,
            "mean_step_ms": 1e3 * self.step_seconds / max(self.iterations, 1),
            "mean_round_trip_ms": 1e3 * self.round_trip_seconds / max(self.iterations, 1),
            "mean_iteration_ms": 1e3 * self.wall_seconds / n,
            "mean_control_overhead_ms": 1e3 * (self.wall_seconds - self.step_in_back_to_back) / n,
        }


class SchedulerService:
    def __init__(self, config: SchedulerServiceConfig, bus: Bus):
        self.config = config
        self.bus = bus
        self.core = None
        self.jobs: JobTable | None = None
        self.worker: WorkerInfo | None = None
        self.times = LoopTimes()
        self._worker_seen = asyncio.Event()
        self._wake = asyncio.Event()
        self._inbox: list[tuple[str, object]] = []
        self._expect: dict[int, asyncio.Future] = {}  # iteration -> its result, while in flight
        self._recent_cancels: OrderedDict[str, None] = OrderedDict()
        self._tasks: list[asyncio.Task] = []
        self._subs = []
        self._stopping = False
        self._events_now: list[tuple[str, TokenEvent]] = []  # errors found outside a result
        self.failed: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        c = self.config
        bus = self.bus
        await bus.declare_exchange(names.EVENTS_EXCHANGE)
        await bus.declare_exchange(names.CONTROL_EXCHANGE)
        await bus.declare_queue(names.JOB_QUEUE, durable=True)
        await bus.declare_queue(names.scheduler_queue(c.replica), durable=False)
        await bus.declare_queue(names.worker_queue(c.replica), durable=False)
        await bus.declare_queue(names.control_queue(c.instance_id), durable=False, exclusive=True,
                                auto_delete=True, bindings=[(names.CONTROL_EXCHANGE, names.CANCEL_KEY)])
        await bus.declare_queue(names.events_queue(c.instance_id), durable=False, exclusive=True,
                                auto_delete=True,
                                bindings=[(names.EVENTS_EXCHANGE, f"{names.HEARTBEAT_KEY_PREFIX}.worker.#")])
        self._subs.append(await bus.consume(names.events_queue(c.instance_id), self._on_event, prefetch=16))
        self._subs.append(await bus.consume(names.scheduler_queue(c.replica), self._on_reply, prefetch=64))
        self._subs.append(await bus.consume(names.control_queue(c.instance_id), self._on_control, prefetch=64))
        log.info("scheduler waiting for a worker", replica=c.replica)
        try:
            await asyncio.wait_for(self._worker_seen.wait(), c.worker_wait)
        except asyncio.TimeoutError:
            raise RuntimeError(f"no worker of replica {c.replica!r} sent a heartbeat within {c.worker_wait:.0f}s") from None
        self.core, num_gpu = build_core(c, self.worker)
        self.jobs = JobTable(self.worker, num_gpu, c.instance_id)
        # The shared job queue last: a job is taken only when it can be served.
        self._subs.append(await bus.consume(names.JOB_QUEUE, self._on_job, prefetch=1))
        self._tasks += [asyncio.create_task(self._guarded_loop(), name="scheduler-loop"),
                        asyncio.create_task(self._heartbeat(), name="scheduler-heartbeat")]
        log.info("scheduler started", replica=c.replica, policy=c.policy, kv_policy=c.kv_policy,
                 gpu_blocks=num_gpu, host_blocks=c.host_kv_blocks)

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        for sub in self._subs:
            await sub.cancel()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks.clear()

    # ------------------------------------------------------------------ bus handlers (inbox only)
    async def _on_job(self, body: bytes, headers: dict) -> None:
        msg = decode(body, JobSubmit)
        # Admission: hold the message (and so the rest of the shared queue,
        # which other replicas may take) while this replica is full.
        limit = self.config.max_queued_jobs
        while limit and self.jobs is not None and self.jobs.num_unfinished() + len(self._inbox) >= limit:
            if self._stopping:
                raise RuntimeError("scheduler stopping")  # redelivered to another replica
            await asyncio.sleep(0.01)
        self._push("submit", msg)

    async def _on_control(self, body: bytes, headers: dict) -> None:
        self._push("cancel", decode(body, JobCancel))

    async def _on_reply(self, body: bytes, headers: dict) -> None:
        msg = decode(body, (BatchResult, KVCopyDone))
        if isinstance(msg, BatchResult):
            fut = self._expect.get(msg.iteration)
            if fut is not None and not fut.done():
                fut.set_result(msg)
            else:
                log.warning("stale batch result", iteration=msg.iteration)
        else:
            self._push("copy_done", msg)

    async def _on_event(self, body: bytes, headers: dict) -> None:
        msg = decode(body, Heartbeat)
        if msg.service == "worker" and msg.info.get("replica") == self.config.replica:
            if self.worker is None:
                self.worker = WorkerInfo.from_info(msg.info)
                self._worker_seen.set()
            self.worker.last_seen = time.monotonic()

    def _push(self, kind: str, msg: object) -> None:
        self._inbox.append((kind, msg))
        self._wake.set()

    # ------------------------------------------------------------------ the loop
    async def _guarded_loop(self) -> None:
        try:
            await self._loop()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A scheduler whose state may be inconsistent must not go on
            # serving; stopping its heartbeat makes gateways report it gone.
            log.exception("scheduler loop crashed")
            self.failed = exc
            self._stopping = True

    async def _loop(self) -> None:
        depth = self.config.pipeline_depth
        inflight: OrderedDict[int, tuple[object, asyncio.Future, float]] = OrderedDict()
        pending: list[tuple[str, TokenEvent]] = []
        last_received: float | None = None  # None after an idle wait: the next gap is not back-to-back
        last_stats = 0.0
        while not self._stopping:
            sent_now = False
            if len(inflight) < depth:
                now = time.monotonic()
                self._apply_inbox(now)
                decision = self.core.schedule(now)
                await self._send_plan(decision)
                if decision.batch:
                    cmd = self.jobs.command(self.config.replica, decision)
                    fut = asyncio.get_running_loop().create_future()
                    self._expect[decision.iteration] = fut
                    inflight[decision.iteration] = (decision, fut, time.perf_counter())
                    # Hidden work: the tokens of the iteration just applied go
                    # out while this one runs (their confirms overlap the command's).
                    await asyncio.gather(self._publish(names.worker_queue(self.config.replica), cmd),
                                         self._flush(pending))
                    pending = []
                    sent_now = True
                else:
                    # Nothing ran: settle the decision so the core does not keep it outstanding.
                    self.core.update(IterationResult(decision.iteration, 0.0, []), now)
            pending = await self._flush(pending)
            if time.monotonic() - last_stats >= self.config.stats_interval:
                last_stats = time.monotonic()
                await self._publish_stats()
            if sent_now and len(inflight) < depth:
                continue  # fill the pipeline before waiting
            if not inflight:
                last_received = None
                await self._idle()
                continue
            iteration, (decision, fut, sent) = next(iter(inflight.items()))
            result = await self._wait_result(iteration, fut, sent)
            del inflight[iteration]
            self._expect.pop(iteration, None)
            received = time.perf_counter()
            self.times.record(sent, received, last_received, result.step_seconds)
            last_received = received
            pending = self._apply_result(decision, result) + pending
        await self._flush(pending)

    async def _wait_result(self, iteration: int, fut: asyncio.Future, sent: float) -> BatchResult:
        """The batch's result, or a failed one when the worker stops
        heartbeating (it died) or the result is overdue."""
        c = self.config
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(fut), 1.0)
            except asyncio.TimeoutError:
                pass
            silent = time.monotonic() - self.worker.last_seen
            if silent > c.worker_timeout:
                error = f"the worker sent no heartbeat for {silent:.0f}s (gone?)"
            elif time.perf_counter() - sent > c.result_timeout:
                error = f"no result from the worker within {c.result_timeout:.0f}s"
            else:
                continue
            log.error("batch lost", iteration=iteration, error=error)
            return BatchResult(replica=c.replica, iteration=iteration, error=error)

    async def _idle(self) -> None:
        if self.jobs.has_worker_free():
            await self._publish(names.worker_queue(self.config.replica),
                                BatchCommand(replica=self.config.replica, iteration=-1,
                                             free=self.jobs.take_worker_free()))
        self._wake.clear()
        if not self._inbox:
            # Idle, or waiting on copies: a copy report or a job wakes us.
            timeout = 0.005 if self.jobs.num_unfinished() else 1.0
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    def _apply_inbox(self, now: float) -> None:
        inbox, self._inbox = self._inbox, []
        for kind, msg in inbox:
            if kind == "submit":
                self._submit(msg, now)
            elif kind == "cancel":
                self._cancel(msg.job_id, reason=msg.reason or "cancelled")
            elif kind == "copy_done":
                self._copy_done(msg, now)

    def _submit(self, msg: JobSubmit, now: float) -> None:
        if msg.job_id in self._recent_cancels or msg.job_id in self.jobs:
            return  # cancelled before it arrived, or a redelivery: idempotent
        job, error = self.jobs.admit(msg, now)
        log.info("job received", job_id=msg.job_id, trace_id=msg.trace_id,
                 prompt_tokens=len(msg.prompt_token_ids), error=error)
        if error is not None:
            self._events_now.append((msg.reply_to, TokenEvent(
                job_id=msg.job_id, trace_id=msg.trace_id, token_ids=[], error=error,
                num_prompt_tokens=len(msg.prompt_token_ids), scheduler_id=self.config.instance_id)))
            return
        try:
            self.core.add_job(job.spec, now)
        except ValueError as exc:
            self.jobs.forget(msg.job_id)
            self._events_now.append((msg.reply_to, job.event([], error=str(exc))))

    def _cancel(self, job_id: str, reason: str) -> None:
        self._recent_cancels[job_id] = None
        while len(self._recent_cancels) > 10000:
            self._recent_cancels.popitem(last=False)
        job = self.jobs.get(job_id)
        if job is None:
            return
        log.info("job cancelled", job_id=job_id, trace_id=job.trace_id, reason=reason)
        # The core keeps blocks that an outstanding copy still writes until copy_done.
        self.core.cancel(job_id)
        self.jobs.forget(job_id)

    def _copy_done(self, msg: KVCopyDone, now: float) -> None:
        # Also for jobs cancelled meanwhile: the core frees their blocks only now.
        try:
            self.core.copy_done(msg.job_id, msg.direction, now)
        except ValueError as exc:
            log.error("copy report the core does not expect", job_id=msg.job_id, error=str(exc))
        job = self.jobs.get(msg.job_id)
        if msg.error:
            log.error("KV copy failed", job_id=msg.job_id, direction=msg.direction, error=msg.error)
            if job is not None:
                self._fail(job, f"KV {msg.direction} failed: {msg.error}")

    def _fail(self, job: Job, error: str) -> None:
        self._events_now.append((job.reply_to, job.event([], error=error)))
        self.core.cancel(job.job_id)
        self.jobs.forget(job.job_id)

    def _apply_result(self, decision, result: BatchResult) -> list[tuple[str, TokenEvent]]:
        now = time.monotonic()
        events, finished = [], []
        if result.error:
            log.error("batch failed", iteration=decision.iteration, error=result.error)
            self.core.update(IterationResult(decision.iteration, result.step_seconds, []), now)
            for entry in decision.batch:
                job = self.jobs.get(entry.job_id)
                if job is not None:
                    self._fail(job, f"worker error: {result.error}")
            return self._take_events_now()
        by_id = {r[0]: r for r in result.results}
        for entry in decision.batch:
            job = self.jobs.get(entry.job_id)
            r = by_id.get(entry.job_id)
            if job is None or r is None:
                continue  # a non-final prefill chunk samples nothing
            reason = job.append(int(r[1]))
            events.append((job.reply_to, job.event([int(r[1])], logprob=float(r[2]), top=r[3],
                                                   finish_reason=reason)))
            if reason is not None:
                finished.append(job.job_id)
                log.info("job finished", job_id=job.job_id, trace_id=job.trace_id, reason=reason,
                         generated=len(job.generated))
        self.core.update(IterationResult(decision.iteration, result.step_seconds, finished), now)
        for job_id in finished:
            self.jobs.forget(job_id)
        return self._take_events_now() + events

    def _take_events_now(self) -> list:
        ev, self._events_now = self._events_now, []
        return ev

    async def _send_plan(self, decision) -> None:
        if not self.config.host_kv_blocks:
            return
        moves = [[m.job_id, m.direction, list(m.src_blocks), list(m.dst_blocks)]
                 for m in (*decision.offloads, *decision.uploads)]
        free = self.jobs.take_kv_free()
        if not moves and not free:
            return
        for m in moves:
            self.jobs.mark_moved(m[0])
        await self._publish(names.kvstore_queue(self.config.replica),
                            KVPlan(replica=self.config.replica, iteration=decision.iteration, moves=moves, free=free))

    async def _flush(self, pending: list[tuple[str, TokenEvent]]) -> list:
        # One job's events in order; different jobs concurrently, so that
        # RabbitMQ's publisher confirms overlap instead of adding up.
        by_job: dict[str, list[tuple[str, TokenEvent]]] = {}
        for reply_to, event in self._take_events_now() + pending:
            by_job.setdefault(event.job_id, []).append((reply_to, event))
        if by_job:
            await asyncio.gather(*(self._publish_events(evs) for evs in by_job.values()))
        return []

    async def _publish_events(self, events: list[tuple[str, TokenEvent]]) -> None:
        for reply_to, event in events:
            try:
                await self._publish(reply_to, event)
            except UnroutableError:
                # The owning gateway is gone: nobody will read this job's tokens.
                log.warning("reply queue gone, cancelling", job_id=event.job_id, trace_id=event.trace_id)
                if not event.finished:
                    self._push("cancel", JobCancel(job_id=event.job_id, trace_id=event.trace_id,
                                                   reason="reply queue gone"))
                return

    async def _publish(self, key: str, msg, *, exchange: str = "") -> None:
        await self.bus.publish(key, encode(msg), exchange=exchange)

    # ------------------------------------------------------------------ stats and liveness
    def stats_message(self) -> SchedulerStats:
        core = self.core
        gpu_total = max(self.jobs.num_gpu_blocks, 1)
        host_total = max(self.config.host_kv_blocks, 1)
        return SchedulerStats(
            instance_id=self.config.instance_id, ts=time.time(), model=self.config.model,
            queue_lengths=list(core.queue_lengths()), num_running=core.num_running,
            num_waiting=core.num_waiting, num_swapped=core.num_swapped,
            gpu_kv_usage=core.gpu_blocks_used() / gpu_total,
            cpu_kv_usage=core.host_blocks_used() / host_total if self.config.host_kv_blocks else 0.0,
            num_preemptions=_stat(core.stats, "preemptions"), max_queued_jobs=self.config.max_queued_jobs)

    async def _publish_stats(self) -> None:
        await self._publish(names.stats_key(self.config.instance_id), self.stats_message(),
                            exchange=names.EVENTS_EXCHANGE)

    async def _heartbeat(self) -> None:
        c = self.config
        while not self._stopping:
            info = {"replica": c.replica, "model": c.model, "policy": c.policy, "kv_policy": c.kv_policy,
                    "loop": self.times.summary(), "jobs": self.jobs.num_unfinished()}
            hb = Heartbeat(service="scheduler", instance_id=c.instance_id, ts=time.time(), info=info)
            try:
                await self._publish(names.heartbeat_key("scheduler", c.instance_id), hb, exchange=names.EVENTS_EXCHANGE)
            except Exception as exc:  # the bus reconnects; liveness must not kill the service
                log.warning("heartbeat failed", error=str(exc))
            await asyncio.sleep(c.heartbeat_interval)


def _stat(stats, name: str) -> int:
    if isinstance(stats, dict):
        return int(stats.get(name, 0))
    return int(getattr(stats, name, 0))


__all__ = ["SchedulerService", "SchedulerServiceConfig", "JobTable", "WorkerInfo", "build_core"]
