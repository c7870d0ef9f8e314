"""The leader of a split replica (stage 0, TP rank 0): the one rank the worker
service talks to. `submit(work)` and `copy_out`/`copy_in` return at once with
a concurrent.futures.Future; up to P batches in flight keep all P stages busy.

Two threads: the stage-0 thread takes items in submission order, broadcasts
each to the stage's TP peers, runs stage 0 and sends it on; the reply thread
receives the last stage's replies (also in submission order) and completes
the futures. A decode job may appear in consecutive batches with
token_ids=[PENDING_TOKEN]: the stage-0 thread waits for the batch that
samples that token before it runs the job again (the only wait a pipeline
needs; batches of disjoint jobs never wait).
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from fastserve.gpu_worker.batch import PENDING_TOKEN, SeqResult, SeqWork
from fastserve.gpu_worker.engine import check_unique
from fastserve.gpu_worker.stage import StageRunner
from fastserve.gpu_worker.stage_wire import Item, Kind, Link, decode_results, encode_copy, encode_work

log = logging.getLogger("fastserve.worker.leader")


@dataclass
class StepOutput:
    results: list[SeqResult]  # one per sample=True entry, in work order
    latency_seconds: float  # submit() to results
    stage_seconds: list[float]  # each stage's compute (TP rank 0's), sampling included on the last
    transfer_seconds: list[float]  # each stage's receiving of the item after its header (stage 0: the TP broadcast)
    started_at: float  # time.perf_counter() when stage 0 began the batch...
    finished_at: float  # ...and when its results reached the leader


@dataclass
class _Entry:
    kind: Kind
    seq: int
    future: Future
    work: list[SeqWork] = field(default_factory=list)
    desc: bytes = b""
    pending: list[tuple[int, Future]] = field(default_factory=list)  # (index in work, batch that samples it)
    submitted: float = field(default_factory=time.perf_counter)
    started: float = 0.0


class PipelineBroken(RuntimeError):
    """The process group failed (a rank died, a timeout): no item completes any more."""


class PipelineLeader:
    def __init__(self, runner: StageRunner, keepalive_seconds: float):
        """keepalive_seconds: an idle pipeline sends a no-op this often, so
        that no rank's receive reaches the process group's timeout."""
        ctx = runner.ctx
        self.runner, self.engine = runner, runner.engine
        self.num_stages = ctx.pipeline_parallel_size
        self.keepalive_seconds = keepalive_seconds
        self._seq = itertools.count()
        self._queue: queue.SimpleQueue[_Entry] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting: dict[int, _Entry] = {}  # sent, reply not yet received
        self._last_sample: dict[str, Future] = {}  # job -> the latest submitted batch that samples it
        self._released: list[str] = []  # finished jobs whose sampling state the last stage is to drop
        self._broken: BaseException | None = None
        self._closed = False
        self._replies = Link(ctx.result_group, ctx.rank + (self.num_stages - 1) * ctx.tensor_parallel_size,
                             self.num_stages) if self.num_stages > 1 else None
        self._threads = [threading.Thread(target=self._guard, args=(self._stage0_loop,), name="stage0", daemon=True)]
        if self._replies is not None:
            self._threads.append(threading.Thread(target=self._guard, args=(self._reply_loop,), name="replies",
                                                  daemon=True))
        for t in self._threads:
            t.start()

    @property
    def ctx(self):
        return self.runner.ctx

    # ------------------------------------------------------------------ API
    def submit(self, work: list[SeqWork]) -> Future:
        """Queue one iteration; the future gives a StepOutput. Invalid work
        raises here and never enters the pipeline."""
        if not work:
            raise ValueError("an empty batch")
        check_unique(work)
        future = Future()
        entry = _Entry(Kind.BATCH, 0, future, list(work))
        with self._lock:
            self._check_open()
            for i, w in enumerate(work):
                if PENDING_TOKEN in w.token_ids:
                    source = self._last_sample.get(w.job_id)
                    if w.token_ids != [PENDING_TOKEN] or source is None:
                        raise ValueError(f"job {w.job_id}: token_ids=[PENDING_TOKEN] needs an earlier batch "
                                         f"that samples the job ({w.token_ids[:3]}...)")
                    entry.pending.append((i, source))
                    self.engine.validate(SeqWork(w.job_id, [0], w.num_computed, w.block_table))
                else:
                    self.engine.validate(w)
            for w in work:
                if w.sample:
                    self._last_sample[w.job_id] = future
            entry.seq = next(self._seq)
            self._queue.put(entry)
        return future

    def copy_out(self, gpu_blocks: list[int], host_blocks: list[int], pool: tuple[str, int, int] | None = None) -> Future:
        """Copy device blocks to host blocks on every rank, after every batch
        submitted before and before every batch submitted after. The future
        (its result: seconds) completes once all ranks have finished. `pool`:
        (path, num_blocks, bytes_per_block) of a KV store's pool every rank
        maps first if it has not yet."""
        return self._copy("out", gpu_blocks, host_blocks, pool)

    def copy_in(self, host_blocks: list[int], gpu_blocks: list[int], pool: tuple[str, int, int] | None = None) -> Future:
        return self._copy("in", list(gpu_blocks), list(host_blocks), pool)

    def forget(self, job_ids) -> None:
        """Drop what the leader remembers of finished jobs; the last stage
        forgets their sampling state with the next batch."""
        with self._lock:
            for job_id in job_ids:
                self._last_sample.pop(job_id, None)
                self._released.append(job_id)

    @property
    def in_flight(self) -> int:
        """Items submitted and not yet completed."""
        with self._lock:
            return len(self._waiting) + self._queue.qsize()

    def close(self, timeout: float = 60.0) -> None:
        """Stop every rank's loop (they return from serve()) and the threads."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_Entry(Kind.STOP, next(self._seq), Future()))
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if self._broken is not None:  # the group is dead; a blocked receive ends with its timeout
            return
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            raise TimeoutError(f"leader threads {alive} did not stop within {timeout}s")
        self.runner.flush()

    # ------------------------------------------------------------------ threads
    def _copy(self, direction: str, gpu_blocks: list[int], host_blocks: list[int],
              pool: tuple[str, int, int] | None) -> Future:
        gpu_blocks, host_blocks = list(gpu_blocks), list(host_blocks)
        if pool is None:
            self.engine.kv.check_copy(gpu_blocks, host_blocks)
        future = Future()
        with self._lock:
            self._check_open()
            self._queue.put(_Entry(Kind.COPY, next(self._seq), future,
                                   desc=encode_copy(direction, gpu_blocks, host_blocks, pool)))
        return future

    def _check_open(self) -> None:
        if self._broken is not None:
            raise PipelineBroken(f"the pipeline failed: {self._broken}") from self._broken
        if self._closed:
            raise RuntimeError("the pipeline leader is closed")

    def _guard(self, loop) -> None:
        if self.engine.device.type == "cuda":
            torch.cuda.set_device(self.engine.device)
        try:
            loop()
        except BaseException as exc:  # a dead peer or a timeout: fail everything, accept nothing
            log.exception("pipeline thread %s failed", threading.current_thread().name)
            with self._lock:
                self._broken = exc
                waiting = list(self._waiting.values())
                self._waiting.clear()
            while True:
                try:
                    waiting.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            for entry in waiting:
                if not entry.future.done():
                    entry.future.set_exception(PipelineBroken(f"the pipeline failed: {exc}"))

    def _stage0_loop(self) -> None:
        while True:
            try:
                entry = self._queue.get(timeout=self.keepalive_seconds)
            except queue.Empty:
                entry = _Entry(Kind.NOOP, next(self._seq), Future())
            if self._broken is not None:  # the reply thread failed: nothing can complete
                entry.future.set_exception(PipelineBroken(f"the pipeline failed: {self._broken}"))
                if entry.kind == Kind.STOP:
                    return
                continue
            if entry.kind == Kind.BATCH:
                try:
                    self._resolve(entry)
                except Exception as exc:  # the batch that was to sample a token failed: so does this one
                    entry.future.set_exception(exc)
                    continue
                with self._lock:
                    release, self._released = self._released, []
                entry.desc = encode_work(entry.work, release)
            entry.started = time.perf_counter()
            item = Item(entry.kind, entry.seq, entry.desc, timings=[0] * (2 * self.num_stages))
            with self._lock:
                self._waiting[entry.seq] = entry
            if self.runner.fanout is not None:
                t0 = time.perf_counter_ns()
                self.runner.fanout.send(item)
                item.timings[1] = time.perf_counter_ns() - t0
            reply = self.runner.handle(item)
            if reply is not None:
                self._complete(reply)
            if entry.kind == Kind.STOP:
                return

    def _resolve(self, entry: _Entry) -> None:
        for i, source in entry.pending:
            w = entry.work[i]
            token = next(r.token_id for r in source.result().results if r.job_id == w.job_id)
            entry.work[i] = SeqWork(w.job_id, [token], w.num_computed, w.block_table, w.sampling,
                                    w.num_generated, w.sample)

    def _reply_loop(self) -> None:
        while True:
            reply = self._replies.recv()
            self._complete(reply)
            if reply.kind == Kind.STOP:
                return

    def _complete(self, reply: Item) -> None:
        with self._lock:
            entry = self._waiting.pop(reply.seq)
        now = time.perf_counter()
        if reply.kind == Kind.RESULT:
            t = reply.timings
            entry.future.set_result(StepOutput(decode_results(reply.desc), now - entry.submitted,
                                               [ns / 1e9 for ns in t[0::2]], [ns / 1e9 for ns in t[1::2]],
                                               entry.started, now))
        elif reply.kind == Kind.COPY_DONE:
            entry.future.set_result(now - entry.submitted)
        else:
            entry.future.set_result(None)
