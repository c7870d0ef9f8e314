"""The GPU worker service: executes the scheduler's batch commands on an
`Engine` and the KV store's block copies beside them.

One consumer on the worker queue receives both kinds of message in order and
only files them: steps run one after another in `_step_loop` (in a thread, so
the event loop keeps copying, heartbeating and receiving), copies run as soon
as the steps they depend on are done, concurrently with the current step.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import structlog

from fastserve.common import names
from fastserve.common.bus import Bus
from fastserve.common.lifecycle import ServiceTasks, send_heartbeats
from fastserve.common.schemas import BatchCommand, BatchResult, KVCopy, KVCopyDone, decode, encode

log = structlog.get_logger("fastserve.worker")


@dataclass
class WorkerServiceConfig:
    model: str  # checkpoint directory
    replica: str = "default"
    instance_id: str = ""
    device: str = "cpu"
    dtype: str = "float32"
    block_size: int = 16
    gpu_kv_blocks: int | None = None  # None: the engine sizes the pool from free memory
    host_kv_blocks: int = 0
    host_kv_path: str | None = None  # None: the default path of the replica's KV store
    heartbeat_interval: float = 1.0
    pool_wait: float = 60.0  # how long to wait for the KV store's shared pool

    def __post_init__(self) -> None:
        if not self.instance_id:
            self.instance_id = f"worker-{self.replica}-{uuid.uuid4().hex[:6]}"
        if self.block_size <= 0 or self.host_kv_blocks < 0:
            raise ValueError("block_size must be > 0 and host_kv_blocks >= 0")
        if self.gpu_kv_blocks is not None and self.gpu_kv_blocks <= 0:
            raise ValueError(f"gpu_kv_blocks must be > 0, got {self.gpu_kv_blocks}")


@dataclass
class _Seq:
    tokens: list[int]
    sampling: object  # SamplingParams
    block_table: list[int] = field(default_factory=list)
    num_generated: int = 0
    trace_id: str = ""


class WorkerService:
    def __init__(self, config: WorkerServiceConfig, bus: Bus):
        self.config = config
        self.bus = bus
        self.engine = None
        self.pool = None
        self.seqs: dict[str, _Seq] = {}
        self._steps: asyncio.Queue[BatchCommand] = asyncio.Queue()
        self._pending_iters: list[int] = []  # received, not yet finished, in order
        self._step_done = asyncio.Condition()
        self._tasks = ServiceTasks(log)  # the step loop, the heartbeat and one task per copy
        self._stopping = False
        # (prefill tokens, decode jobs, decode context sum, seconds) per step:
        # the in-situ cost of iterations, for calibrating the simulator.
        self.step_log: deque[tuple[int, int, int, float]] = deque(maxlen=100_000)
        self.stats = {"steps": 0, "step_seconds": 0.0, "copies": 0, "copy_seconds": 0.0, "copy_blocks": 0}

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        c = self.config
        self.engine = await asyncio.to_thread(self._make_engine)
        q = names.worker_queue(c.replica)
        await self.bus.declare_exchange(names.EVENTS_EXCHANGE)
        await self.bus.declare_queue(q, durable=False)
        self._tasks.add_subscription(await self.bus.consume(q, self._on_message, prefetch=64))
        steps = self._tasks.spawn(self._step_loop(), "worker-steps")
        # A worker whose step loop died must stop looking alive, so the
        # scheduler fails its jobs at once instead of after result_timeout.
        self._tasks.spawn(send_heartbeats(self.bus, "worker", c.instance_id, c.heartbeat_interval, self.info,
                                          lambda: not self._stopping and not steps.done(), log),
                          "worker-heartbeat")
        e = self.engine
        log.info("worker started", replica=c.replica, device=c.device, gpu_blocks=e.num_gpu_blocks,
                 host_blocks=e.num_host_blocks, block_size=e.block_size)

    def _make_engine(self):
        from fastserve.gpu_worker.engine import Engine
        from fastserve.common.host_pool import HostKVPool, PoolSpec, default_pool_path, kv_bytes_per_block

        c = self.config
        buffer = None
        if c.host_kv_blocks:
            bpb = kv_bytes_per_block(c.model, c.block_size, c.dtype)
            spec = PoolSpec(c.host_kv_path or str(default_pool_path(c.replica)), c.host_kv_blocks, bpb)
            self.pool = HostKVPool.attach(spec, timeout=c.pool_wait)
            buffer = self.pool.tensor
        engine = Engine(c.model, dtype=c.dtype, device=c.device, block_size=c.block_size,
                        num_gpu_blocks=c.gpu_kv_blocks, num_host_blocks=c.host_kv_blocks,
                        host_kv_buffer=buffer)
        if self.pool is not None:
            assert engine.bytes_per_block == self.pool.spec.bytes_per_block, (
                engine.bytes_per_block, self.pool.spec.bytes_per_block)
            if engine.device.type == "cuda":
                self._check_pinned(engine)
        return engine

    def _check_pinned(self, engine) -> None:
        import torch

        # The engine page-locks the shared pool with cudaHostRegister and does
        # not read its status: a refusal (e.g. a pool file outside tmpfs)
        # stays as this thread's last CUDA error and would fail whichever
        # later kernel launch on this thread checks it. A throwaway launch
        # surfaces (and so clears) it here.
        error = None
        for _ in range(2):
            try:
                torch.ones(1, device=engine.device).add_(1)
                torch.cuda.synchronize(engine.device)
                break
            except Exception as exc:  # torch.AcceleratorError (a RuntimeError)
                error = str(exc).splitlines()[0]
        pinned = bool(engine.kv.host.is_pinned())
        if error or not pinned:
            log.warning("host KV pool not page-locked: copies to and from it are synchronous",
                        cuda_error=error, path=self.pool.spec.path)

    async def stop(self) -> None:
        self._stopping = True
        await self._tasks.close()
        if self.pool is not None:
            self.pool.close()

    def info(self) -> dict:
        e = self.engine
        mc = e.model_config
        return {"replica": self.config.replica, "device": self.config.device,
                "num_gpu_blocks": e.num_gpu_blocks, "num_host_blocks": e.num_host_blocks,
                "block_size": e.block_size, "bytes_per_block": e.bytes_per_block,
                "max_model_len": mc.max_model_len, "vocab_size": mc.vocab_size,
                "eos_token_ids": list(mc.eos_token_ids), "jobs": len(self.seqs), **self.stats}

    # ------------------------------------------------------------------ intake
    async def _on_message(self, body: bytes, headers: dict) -> None:
        msg = decode(body, (BatchCommand, KVCopy))
        if isinstance(msg, BatchCommand):
            if not msg.run:
                # Only ids to forget (the scheduler is idle): no step, no reply.
                assert not msg.new, "a command registering jobs must run them"
                self._forget(msg.free)
                return
            self._pending_iters.append(msg.iteration)
            self._steps.put_nowait(msg)
        else:
            self._tasks.spawn(self._copy(msg), f"copy-{msg.copy_id}")

    def _forget(self, job_ids: list[str]) -> None:
        self.engine.release(job_ids)
        for job_id in job_ids:
            seq = self.seqs.pop(job_id, None)
            if seq is not None:
                log.debug("job freed", job_id=job_id, trace_id=seq.trace_id, generated=seq.num_generated)

    # ------------------------------------------------------------------ steps
    async def _step_loop(self) -> None:
        while not self._stopping:
            cmd = await self._steps.get()
            try:
                result = await self._run(cmd)
            except Exception as exc:  # report, never die: the scheduler fails the batch's jobs
                log.exception("step failed", iteration=cmd.iteration)
                result = BatchResult(replica=cmd.replica, iteration=cmd.iteration, error=f"{type(exc).__name__}: {exc}")
            async with self._step_done:
                self._pending_iters.remove(cmd.iteration)
                self._step_done.notify_all()
            await self._reply(names.scheduler_queue(cmd.replica), result)

    async def _reply(self, key: str, msg) -> None:
        try:
            await self.bus.publish(key, encode(msg))
        except Exception:  # the scheduler times the batch out; the worker goes on
            log.exception("reply not delivered", to=key, message=type(msg).__name__)

    async def _run(self, cmd: BatchCommand) -> BatchResult:
        from fastserve.gpu_worker.batch import SeqWork
        from fastserve.common.sampling_params import SamplingParams

        self._forget(cmd.free)
        for job_id, tokens, sampling, *rest in cmd.new:
            trace_id = rest[0] if rest else ""
            self.seqs[job_id] = _Seq(list(tokens), SamplingParams.from_dict(sampling), trace_id=trace_id)
            log.debug("job registered", job_id=job_id, trace_id=trace_id, tokens=len(tokens))
        work = []
        for job_id, num_computed, num_new, sample, append, table in cmd.run:
            seq = self.seqs.get(job_id)
            if seq is None:
                raise KeyError(f"job {job_id} is not known to this worker (lost state?)")
            if table is not None:
                seq.block_table = list(table)
            else:
                seq.block_table.extend(append)
            end = num_computed + num_new
            if end > len(seq.tokens) or (sample and end != len(seq.tokens)):
                raise ValueError(f"job {job_id}: tokens [{num_computed}, {end}) but the worker holds {len(seq.tokens)}")
            work.append(SeqWork(job_id=job_id, token_ids=seq.tokens[num_computed:end], num_computed=num_computed,
                                block_table=list(seq.block_table), sampling=seq.sampling,
                                num_generated=seq.num_generated, sample=bool(sample)))
        results, seconds = await asyncio.to_thread(self._timed_step, work)
        out = []
        for r in results:
            seq = self.seqs[r.job_id]
            seq.tokens.append(r.token_id)
            seq.num_generated += 1
            top = [[int(t), float(v)] for t, v in r.top_logprobs] if r.top_logprobs else None
            out.append([r.job_id, int(r.token_id), float(r.logprob), top, r.prompt_logprobs])
        self.stats["steps"] += 1
        self.stats["step_seconds"] += seconds
        decodes = [w.num_computed + 1 for w in work if len(w.token_ids) == 1]
        self.step_log.append((sum(len(w.token_ids) for w in work if len(w.token_ids) > 1),
                              len(decodes), sum(decodes), seconds))
        return BatchResult(replica=cmd.replica, iteration=cmd.iteration, results=out, step_seconds=seconds)

    def _timed_step(self, work):
        t0 = time.perf_counter()
        results = self.engine.step(work)  # no results when only non-final prefill chunks ran
        return results, time.perf_counter() - t0

    # ------------------------------------------------------------------ copies
    async def _copy(self, msg: KVCopy) -> None:
        # The blocks of an offload were written by steps up to after_iteration:
        # wait for those steps, but not for later ones (the copy overlaps them).
        async with self._step_done:
            await self._step_done.wait_for(
                lambda: not any(i <= msg.after_iteration for i in self._pending_iters))
        t0 = time.perf_counter()
        error = None
        try:
            # In a thread: on CPU the copy itself is synchronous; on CUDA this
            # only queues it on the engine's side stream.
            copy = self.engine.copy_out if msg.direction == "offload" else self.engine.copy_in
            handle = await asyncio.to_thread(copy, list(msg.src_blocks), list(msg.dst_blocks))
            while not handle.done():
                await asyncio.sleep(0.0005)
            handle.wait()
        except Exception as exc:
            log.exception("copy failed", job_id=msg.job_id, copy_id=msg.copy_id)
            error = f"{type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - t0
        self.stats["copies"] += 1
        self.stats["copy_seconds"] += seconds
        self.stats["copy_blocks"] += len(msg.src_blocks)
        log.debug("copy done", job_id=msg.job_id, direction=msg.direction, blocks=len(msg.src_blocks), seconds=seconds)
        done = KVCopyDone(replica=msg.replica, copy_id=msg.copy_id, job_id=msg.job_id, direction=msg.direction,
                          seconds=seconds, error=error)
        await self._reply(msg.reply_to or names.scheduler_queue(msg.replica), done)
