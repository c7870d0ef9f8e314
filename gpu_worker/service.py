"""The GPU worker service: executes its scheduler's batch commands on an
`Engine`, and the KV store's block copies beside them.

Its command queue belongs to this instance (exclusive: it dies with the
process, stale commands included). One consumer receives both kinds of
message in order and only files them: steps run one after another in
`_step_loop` (in a thread, so the event loop keeps copying, heartbeating and
receiving); copies run in their own thread, one at a time, beside the steps.
The scheduler never moves or frees the blocks of a job with an iteration in
flight, so copies and steps never touch the same blocks.

The worker holds every job's tokens and appends each one it samples: a
decode job in consecutive commands reads the token it sampled the iteration
before, so the scheduler can plan iteration i+1 while i runs.

A command of a newer epoch means the scheduler started over (it lost track
of what this worker holds): every job is forgotten first. Commands of older
epochs are dropped. A job whose part of a step fails (bad parameters, ...)
gets an error alone; the rest of the batch goes on.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import structlog

from fastserve.common import names
from fastserve.common import settings as S
from fastserve.common.bus import Bus
from fastserve.common.lifecycle import ServiceTasks, send_heartbeats
from fastserve.common.outbox import Outbox
from fastserve.common.schemas import (
    BatchCommand, BatchResult, KVCopy, KVCopyDone, PoolSpec, PromptLogprob, SampledToken, TopLogprob, WorkerInfo,
    decode,
)

log = structlog.get_logger("fastserve.worker")

_RECENT_COPIES = 10000  # copies remembered for deduplication (far more than are ever in flight)


@dataclass
class WorkerServiceConfig:
    model: str = S.MODEL()
    replica: str = S.REPLICA()
    instance_id: str = S.INSTANCE_ID()
    device: str = S.DEVICE()
    dtype: str = S.DTYPE()
    block_size: int = S.BLOCK_SIZE()
    gpu_kv_blocks: int | None = S.GPU_KV_BLOCKS()  # None: the engine sizes the pool from free memory
    heartbeat_interval: float = S.HEARTBEAT_INTERVAL()
    pipeline_parallel_size: int = S.PIPELINE_PARALLEL_SIZE()
    tensor_parallel_size: int = S.TENSOR_PARALLEL_SIZE()
    dist_init: str | None = S.DIST_INIT()
    layer_split: tuple[int, ...] | None = S.LAYER_SPLIT()
    dist_timeout: float = S.DIST_TIMEOUT()

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model is required")
        if not self.instance_id:
            self.instance_id = f"worker-{self.replica}-{uuid.uuid4().hex[:6]}"
        S.validate(self)

    @property
    def world_size(self) -> int:
        return self.pipeline_parallel_size * self.tensor_parallel_size


@dataclass
class _Seq:
    tokens: list[int]
    sampling: object  # SamplingParams
    block_table: list[int] = field(default_factory=list)
    num_generated: int = 0
    trace_id: str = ""
    pending: int = 0  # tokens it samples in batches submitted to a pipeline whose results are not back


class WorkerService:
    def __init__(self, config: WorkerServiceConfig, bus: Bus):
        self.config = config
        self.bus = bus
        self.engine = None  # the Engine (rank 0's, when the replica is split over ranks)
        self.leader = None  # the PipelineLeader of a split replica (gpu_worker/leader.py)
        self.pool = None  # the host pool mapped now (common.host_pool.HostKVPool)
        self.queue = names.worker_queue(config.replica, config.instance_id)
        self.seqs: dict[str, _Seq] = {}
        self.scheduler_id = ""  # the scheduler whose commands it runs
        self.epoch = -1  # that scheduler's newest epoch seen
        self.received = -1  # highest iteration received in that epoch
        # Copies received lately, by (job, move): a copy published twice (its
        # confirm lost in a broker restart) must not run again, since by then
        # its blocks may belong to another job.
        self._recent_copies: OrderedDict[tuple[str, int], None] = OrderedDict()
        self.completed = -1  # highest iteration finished in that epoch
        self._steps: asyncio.Queue[BatchCommand] = asyncio.Queue()
        self._copier = ThreadPoolExecutor(1, thread_name_prefix="kv-copy")
        self._tasks = ServiceTasks(log)  # the step loop, the heartbeat and one task per copy
        self._results = Outbox(bus, self._unroutable)
        self._reports = Outbox(bus, self._unroutable, exchange=names.KV_EXCHANGE)
        self._stopping = False
        # (prefill tokens, decode jobs, decode context sum, seconds) per step:
        # the in-situ cost of iterations, for calibrating the simulator.
        self.step_log: deque[tuple[int, int, int, float]] = deque(maxlen=100_000)
        self.stats = {"steps": 0, "step_seconds": 0.0, "copies": 0, "copy_seconds": 0.0, "copy_blocks": 0,
                      "duplicate_commands": 0, "duplicate_copies": 0}

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        c = self.config
        self.engine = await asyncio.to_thread(self._make_engine)
        await self.bus.declare_exchange(names.EVENTS_EXCHANGE)
        await self.bus.declare_exchange(names.KV_EXCHANGE)
        await self.bus.declare_queue(self.queue, durable=False, exclusive=True, auto_delete=True)
        await self.bus.declare_queue(names.scheduler_queue(c.replica), durable=False,
                                     bindings=[(names.KV_EXCHANGE, names.kv_done_key(c.replica))])
        self._queue_sub = await self.bus.consume(self.queue, self._on_message, prefetch=256)
        self._tasks.add_subscription(self._queue_sub)
        steps = self._steps_task = self._tasks.spawn(self._step_loop(), "worker-steps")
        # A broken worker drops its queue at once (auto-delete): the
        # scheduler's next command is unroutable and it moves on without
        # waiting for the heartbeat timeout.
        steps.add_done_callback(lambda t: None if self._stopping else self._tasks.spawn(
            self._queue_sub.cancel(), "worker-drop-queue"))
        # A worker whose step loop died must stop looking alive, so the
        # scheduler gives its jobs to the next worker at once.
        self._tasks.spawn(send_heartbeats(self.bus, "worker", c.instance_id, c.heartbeat_interval, self._heartbeat,
                                          lambda: not self._stopping and not steps.done(), log),
                          "worker-heartbeat")
        e = self.engine
        log.info("worker started", replica=c.replica, device=c.device, gpu_blocks=e.num_gpu_blocks,
                 block_size=e.block_size, queue=self.queue)

    def _make_engine(self):
        """One Engine, or rank 0 of a replica split over P stages x T ranks
        (gpu_worker/launch.py): then the leader drives the other ranks, which
        run `fastserve worker --rank R` (or `fastserve up`'s own processes)."""
        c = self.config
        if c.world_size == 1:
            from fastserve.gpu_worker.engine import Engine

            return Engine(c.model, dtype=c.dtype, device=c.device, block_size=c.block_size,
                          num_gpu_blocks=c.gpu_kv_blocks)
        from fastserve.gpu_worker.launch import launch_rank

        self.leader = launch_rank(c.model, c.pipeline_parallel_size, c.tensor_parallel_size, 0, c.dist_init,
                                  device=c.device, timeout=c.dist_timeout, layer_split=c.layer_split,
                                  dtype=c.dtype, block_size=c.block_size, num_gpu_blocks=c.gpu_kv_blocks)
        return self.leader.engine

    async def stop(self) -> None:
        self._stopping = True
        await self._results.drain(2.0)
        await self._reports.drain(1.0)
        await self._tasks.close()
        await self._results.close()
        await self._reports.close()
        self._copier.shutdown(wait=True)
        if self.leader is not None:
            from fastserve.gpu_worker.launch import shutdown_distributed

            await asyncio.to_thread(self.leader.close)
            shutdown_distributed(self.leader.ctx)
        if self.pool is not None:
            self.pool.close()

    @property
    def broken(self) -> bool:
        """Its step loop died (e.g. a rank of its split replica is gone): it
        no longer heartbeats, and only a new worker (group) serves again."""
        task = getattr(self, "_steps_task", None)
        return task is not None and task.done() and not self._stopping

    def worker_info(self) -> WorkerInfo:
        e = self.engine
        mc = e.model_config
        c = self.config
        return WorkerInfo(num_gpu_blocks=e.num_gpu_blocks, block_size=e.block_size, max_model_len=mc.max_model_len,
                          vocab_size=mc.vocab_size, eos_token_ids=list(mc.eos_token_ids),
                          bytes_per_block=e.pool_bytes_per_block, device=c.device,
                          pipeline_parallel_size=c.pipeline_parallel_size,
                          tensor_parallel_size=c.tensor_parallel_size)

    def _heartbeat(self) -> dict:
        return {"replica": self.config.replica, "queue": self.queue, "worker": self.worker_info(),
                "scheduler_id": self.scheduler_id, "epoch": self.epoch, "received": self.received, "completed": self.completed,
                "info": {"jobs": len(self.seqs), **self.stats}}

    def _unroutable(self, key: str, msg, exc: Exception) -> None:
        # The scheduler's queue is declared by both sides and survives it; a
        # result nobody can take is dropped (the scheduler times the batch out).
        log.warning("reply not deliverable", to=key, message=type(msg).__name__)

    # ------------------------------------------------------------------ intake
    async def _on_message(self, body: bytes, headers: dict) -> None:
        msg = decode(body, (BatchCommand, KVCopy))
        if isinstance(msg, BatchCommand):
            if msg.scheduler_id != self.scheduler_id:
                # A new scheduler (the old one died): its epochs count afresh.
                # Commands of the old one still queued ahead of it are stale.
                self.scheduler_id, self.epoch, self.received, self.completed = msg.scheduler_id, msg.epoch, -1, -1
            elif msg.epoch < self.epoch:
                return  # from before the scheduler started over: stale
            elif msg.epoch > self.epoch:
                self.epoch, self.received, self.completed = msg.epoch, -1, -1
            elif msg.run and msg.iteration <= self.received:
                # A publish retried after its confirm was lost (broker restart):
                # running it again would sample a token the scheduler never counts.
                log.warning("duplicate command dropped", iteration=msg.iteration, epoch=msg.epoch)
                self.stats["duplicate_commands"] += 1
                return
            self.received = max(self.received, msg.iteration)
            self._steps.put_nowait(msg)
        else:
            key = (msg.job_id, msg.move_id)
            if key in self._recent_copies:
                log.warning("duplicate KV copy dropped", job_id=msg.job_id, move_id=msg.move_id)
                self.stats["duplicate_copies"] += 1
                return
            self._recent_copies[key] = None
            if len(self._recent_copies) > _RECENT_COPIES:
                self._recent_copies.popitem(last=False)
            self._tasks.spawn(self._copy(msg), f"copy-{msg.move_id}")

    def _forget(self, job_ids) -> None:
        if self.leader is not None:
            self.leader.forget(job_ids)
        else:
            self.engine.release(job_ids)
        for job_id in job_ids:
            seq = self.seqs.pop(job_id, None)
            if seq is not None:
                log.debug("job freed", job_id=job_id, trace_id=seq.trace_id, generated=seq.num_generated)

    # ------------------------------------------------------------------ steps
    async def _step_loop(self) -> None:
        """Commands in order. One Engine runs one step at a time; a pipeline
        of P stages gets up to P batches in flight (each stage busy with
        another), its results still published in order."""
        epoch = (None, -1)
        depth = self.config.pipeline_parallel_size if self.leader is not None else 1
        inflight: deque = deque()  # (cmd, work, errors, concurrent future), in submission order
        while not self._stopping:
            if inflight and (len(inflight) >= depth or self._steps.empty()):
                await self._finish(*inflight.popleft())
                continue
            cmd = await self._steps.get()
            if cmd.scheduler_id != self.scheduler_id or cmd.epoch < self.epoch:
                continue  # queued before a newer epoch (or scheduler) arrived
            if (cmd.scheduler_id, cmd.epoch) != epoch:
                while inflight:
                    await self._finish(*inflight.popleft())
                if self.seqs:
                    log.warning("scheduler started over: forgetting every job", epoch=cmd.epoch, jobs=len(self.seqs))
                self._forget(list(self.seqs))
                epoch = (cmd.scheduler_id, cmd.epoch)
                # Copies of the old epoch may still write GPU blocks the
                # scheduler now hands out again: let them finish first.
                await asyncio.get_running_loop().run_in_executor(self._copier, lambda: None)
            self._forget(cmd.free)
            if not cmd.run:
                continue  # only ids to forget (the scheduler is idle): no step, no reply
            try:
                work, errors = self._prepare(cmd)
                if self._unknown:
                    # A command that registered them never came: nothing of this
                    # one can be trusted. The scheduler starts over (recompute).
                    log.warning("jobs not known to this worker", jobs=self._unknown[:5], iteration=cmd.iteration)
                    self._reply(cmd, BatchResult(replica=cmd.replica, epoch=cmd.epoch, iteration=cmd.iteration,
                                                 worker_id=self.config.instance_id, unknown_jobs=self._unknown))
                    for w in work:
                        if w.sample and w.job_id in self.seqs:
                            self.seqs[w.job_id].pending -= 1
                    continue
            except Exception as exc:  # report, never die: the scheduler fails the batch's jobs
                log.exception("step failed", iteration=cmd.iteration)
                self._reply(cmd, BatchResult(replica=cmd.replica, epoch=cmd.epoch, iteration=cmd.iteration,
                                             worker_id=self.config.instance_id, error=f"{type(exc).__name__}: {exc}"))
                continue
            if self.leader is None:
                await self._finish(cmd, work, errors, None)
            else:
                # Submitted now, in order; a rank that died fails the future (PipelineBroken).
                inflight.append((cmd, work, errors, self.leader.submit(work) if work else None))

    def _prepare(self, cmd: BatchCommand):
        """Register the new jobs and build the iteration's SeqWork from the
        worker's own tokens. A job whose part cannot run gets an error alone."""
        from fastserve.gpu_worker.batch import PENDING_TOKEN, SeqWork

        errors: dict[str, str] = {}
        self._unknown: list[str] = []
        for new in cmd.new:
            problem = self._check_sampling(new.sampling)
            if problem:
                errors[new.job_id] = problem
                continue
            self.seqs[new.job_id] = _Seq(list(new.token_ids), new.sampling, num_generated=new.num_generated,
                                         trace_id=new.trace_id)
            log.debug("job registered", job_id=new.job_id, trace_id=new.trace_id, tokens=len(new.token_ids))
        work = []
        for e in cmd.run:
            if e.job_id in errors:
                continue
            seq = self.seqs.get(e.job_id)
            if seq is None:
                self._unknown.append(e.job_id)
                continue
            if e.block_table is not None:
                seq.block_table = list(e.block_table)
            else:
                seq.block_table.extend(e.append_blocks)
            end = e.num_computed + e.num_new_tokens
            known = len(seq.tokens) + seq.pending
            if end > known or (e.sample and end != known):
                errors[e.job_id] = f"tokens [{e.num_computed}, {end}) but the worker knows {known}"
                continue
            if end > len(seq.tokens):
                # Sampled by a batch still in the pipeline: stage 0 waits for it.
                tokens = [PENDING_TOKEN] if e.num_new_tokens == 1 else None
                if tokens is None:
                    errors[e.job_id] = "more than one token still in flight for one entry"
                    continue
            else:
                tokens = seq.tokens[e.num_computed:end]
            w = SeqWork(job_id=e.job_id, token_ids=tokens, num_computed=e.num_computed,
                        block_table=list(seq.block_table), sampling=seq.sampling,
                        num_generated=seq.num_generated + seq.pending, sample=e.sample)
            try:
                if tokens != [PENDING_TOKEN]:
                    self.engine.validate(w)
            except ValueError as exc:
                errors[e.job_id] = str(exc)
                continue
            if e.sample:
                seq.pending += 1
            work.append(w)
        return work, errors

    async def _finish(self, cmd: BatchCommand, work, errors: dict[str, str], future) -> None:
        """Wait for an iteration (run it, with one Engine), apply its tokens,
        publish its result."""
        if self.leader is None:
            results, seconds, failed = await asyncio.to_thread(self._isolated_step, work)
        elif future is None:
            results, seconds, failed = [], 0.0, {}
        else:
            out = await asyncio.wrap_future(future)  # PipelineBroken ends the loop: the replica is broken
            # The pipeline's pace is its slowest stage: that is what one iteration costs.
            results, seconds, failed = out.results, max(out.stage_seconds), {}
        errors.update(failed)
        out = []
        for w in work:
            if w.sample and w.job_id in self.seqs:
                self.seqs[w.job_id].pending -= 1
        for r in results:
            seq = self.seqs.get(r.job_id)
            if seq is None:
                continue  # forgotten while its batch was in the pipeline
            seq.tokens.append(r.token_id)
            seq.num_generated += 1
            top = [TopLogprob(int(t), float(v)) for t, v in r.top_logprobs] if r.top_logprobs else None
            prompt_lps = [PromptLogprob(float(lp), int(rank), [TopLogprob(int(t), float(v)) for t, v in alts])
                          for lp, rank, alts in r.prompt_logprobs] if r.prompt_logprobs is not None else None
            out.append(SampledToken(r.job_id, int(r.token_id), float(r.logprob), top, prompt_logprobs=prompt_lps))
        for job_id, error in errors.items():
            log.warning("job failed in the worker", job_id=job_id, error=error)
            self._forget([job_id])
            out.append(SampledToken(job_id, error=error))
        self.stats["steps"] += 1
        self.stats["step_seconds"] += seconds
        decodes = [w.num_computed + 1 for w in work if len(w.token_ids) == 1]
        self.step_log.append((sum(len(w.token_ids) for w in work if len(w.token_ids) > 1),
                              len(decodes), sum(decodes), seconds))
        self._reply(cmd, BatchResult(replica=cmd.replica, epoch=cmd.epoch, iteration=cmd.iteration,
                                     worker_id=self.config.instance_id, tokens=out, step_seconds=seconds))

    def _reply(self, cmd: BatchCommand, result: BatchResult) -> None:
        if cmd.epoch == self.epoch and cmd.scheduler_id == self.scheduler_id:
            self.completed = max(self.completed, cmd.iteration)
        self._results.send(names.scheduler_queue(cmd.replica), result)

    def _check_sampling(self, sampling) -> str | None:
        vocab = self.engine.model_config.vocab_size
        if sampling.top_k > vocab:
            return f"top_k ({sampling.top_k}) exceeds the vocabulary size ({vocab})"
        bad = [t for t in sampling.stop_token_ids if not 0 <= t < vocab]
        if bad:
            return f"stop_token_ids {bad[:5]} outside the vocabulary [0, {vocab})"
        return None

    def _isolated_step(self, work):
        """engine.step over the batch; if it fails, each job alone, so that
        only the jobs that fail by themselves get an error."""
        t0 = time.perf_counter()
        try:
            return self.engine.step(work), time.perf_counter() - t0, {}
        except Exception as exc:
            if len(work) <= 1:
                return [], time.perf_counter() - t0, {w.job_id: f"{type(exc).__name__}: {exc}" for w in work}
            log.warning("batch step failed; running its jobs one by one", error=f"{type(exc).__name__}: {exc}")
        results, failed = [], {}
        for w in work:
            try:
                results.extend(self.engine.step([w]))
            except Exception as exc:
                failed[w.job_id] = f"{type(exc).__name__}: {exc}"
        return results, time.perf_counter() - t0, failed

    # ------------------------------------------------------------------ copies
    async def _copy(self, msg: KVCopy) -> None:
        t0 = time.perf_counter()
        error = None
        try:
            if self.leader is not None:
                # Every rank copies its own chunk of the blocks, ordered with
                # the batches; each maps the pool first if it changed.
                pool = (msg.pool.path, msg.pool.num_blocks, msg.pool.bytes_per_block)
                copy = self.leader.copy_out if msg.direction == "offload" else self.leader.copy_in
                args = (msg.gpu_blocks, msg.host_blocks) if msg.direction == "offload" else (msg.host_blocks,
                                                                                              msg.gpu_blocks)
                await asyncio.wrap_future(copy(*args, pool=pool))
            else:
                await asyncio.get_running_loop().run_in_executor(self._copier, self._copy_blocking, msg)
        except Exception as exc:
            log.exception("copy failed", job_id=msg.job_id, move_id=msg.move_id)
            error = f"{type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - t0
        self.stats["copies"] += 1
        self.stats["copy_seconds"] += seconds
        self.stats["copy_blocks"] += len(msg.gpu_blocks)
        log.debug("copy done", job_id=msg.job_id, direction=msg.direction, blocks=len(msg.gpu_blocks),
                  seconds=seconds)
        done = KVCopyDone(replica=msg.replica, move_id=msg.move_id, job_id=msg.job_id, direction=msg.direction,
                          seconds=seconds, error=error)
        self._reports.send(names.kv_done_key(msg.replica), done)

    def _copy_blocking(self, msg: KVCopy) -> None:
        """In the copy thread (one at a time): map the KV store's pool if it
        changed, then copy. On CUDA the copy runs on the engine's side stream;
        this waits for it."""
        self._map_pool(msg.pool)
        if msg.direction == "offload":
            handle = self.engine.copy_out(list(msg.gpu_blocks), list(msg.host_blocks))
        else:
            handle = self.engine.copy_in(list(msg.host_blocks), list(msg.gpu_blocks))
        handle.wait()

    def _map_pool(self, spec: PoolSpec) -> None:
        from fastserve.common.host_pool import HostKVPool

        if self.pool is not None and self.pool.spec == spec:
            return
        if spec.bytes_per_block != self.engine.pool_bytes_per_block:
            raise ValueError(f"the KV store's pool has blocks of {spec.bytes_per_block} bytes, this engine's are "
                             f"{self.engine.pool_bytes_per_block} (another model, dtype or block size?)")
        pool = HostKVPool.attach(spec)
        self.engine.set_host_pool(pool.tensor, spec.num_blocks)
        if self.engine.device.type == "cuda" and not self.engine.kv.host_pinned:
            log.warning("host KV pool not page-locked: copies to and from it are synchronous", path=spec.path)
        old, self.pool = self.pool, pool
        if old is not None:
            old.close()
        log.info("host KV pool mapped", path=spec.path, blocks=spec.num_blocks)
