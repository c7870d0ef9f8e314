"""One rank of a replica split over P pipeline stages x T tensor-parallel
ranks: it runs its share of each item and passes the item on.

Items enter at the leader (stage 0, TP rank 0, leader.py) in the order they
were submitted and every rank handles them in that order: TP rank r of stage
k receives from TP rank r of stage k-1 (stage 0's peers from the leader's
broadcast), runs its layers and sends to TP rank r of stage k+1; the last
stage's TP rank 0 samples and replies to the leader. The batch description
travels with the activations, so a stage needs nothing but its inbound link,
and a KV copy ordered between two batches runs between them on every rank.
"""
from __future__ import annotations

import time

import torch

from fastserve.gpu_worker.engine import Engine
from fastserve.gpu_worker.stage_wire import (Fanout, Item, Kind, Link, decode_copy, decode_release, decode_work,
                                             encode_results)


class StageRunner:
    def __init__(self, engine: Engine, ctx):
        """ctx: the rank's DistContext (launch.py)."""
        self.engine, self.ctx = engine, ctx
        self.pool = None  # the host pool mapped now (common.host_pool.HostKVPool)
        P, T, stage = ctx.pipeline_parallel_size, ctx.tensor_parallel_size, ctx.stage
        self.last = stage == P - 1
        lanes = dict(num_stages=P, hidden_size=engine.model_config.hidden_size, dtype=engine.dtype,
                     device=engine.device, host_staging=ctx.host_staging)
        self.source = None  # where a rank other than the leader gets its items
        if stage > 0:
            self.source = Link(ctx.prev_group, ctx.rank - T, stage=stage, **lanes)
        elif ctx.tp_rank > 0:
            self.source = Fanout(ctx.tp_group, 0, P)
        self.fanout = Fanout(ctx.tp_group, 0, P) if ctx.rank == 0 and T > 1 else None
        self.next = None if self.last else Link(ctx.next_group, ctx.rank + T, **lanes)
        self.reply = Link(ctx.result_group, 0, P) if self.last and ctx.tp_rank == 0 and P > 1 else None

    def handle(self, item: Item) -> Item | None:
        """Run this rank's share of `item` and pass it on. Returns the reply
        only where there is no one to send it to: the leader of a one-stage
        pipeline."""
        t0 = time.perf_counter_ns()
        with torch.inference_mode():
            out = self._run(item)
        if out is not None:
            out.timings[2 * self.ctx.stage] = time.perf_counter_ns() - t0
        if self.next is not None:
            self.next.send(out)
        elif out is not None and self.reply is not None:
            self.reply.send(out)
        else:
            return out
        return None

    def _run(self, item: Item) -> Item | None:
        """What goes on: the item (with this stage's residual stream for a
        batch) off the last stage; the reply on the last stage's TP rank 0;
        nothing on its other TP ranks."""
        e, tp_rank = self.engine, self.ctx.tp_rank
        if not item.timings:
            item.timings = [0] * (2 * self.ctx.pipeline_parallel_size)
        if item.kind == Kind.BATCH:
            work = decode_work(item.desc)
            if not self.last:
                return Item(Kind.BATCH, item.seq, item.desc, e.forward(work, hidden=item.hidden), item.timings)
            if tp_rank:
                e.forward(work, hidden=item.hidden)  # its share of the last layers; rank 0 samples
                return None
            e.release(decode_release(item.desc))
            return Item(Kind.RESULT, item.seq, encode_results(e.step(work, hidden=item.hidden)),
                        timings=item.timings)
        if item.kind == Kind.COPY:
            direction, gpu_blocks, host_blocks, pool = decode_copy(item.desc)
            if pool is not None:
                self.map_pool(*pool)
            copy = e.copy_out(gpu_blocks, host_blocks) if direction == "out" else e.copy_in(host_blocks, gpu_blocks)
            # Done here before it goes on: the reply then means done on every stage.
            copy.wait()
            if not self.last:
                return item
            self._tp_sync()
            return None if tp_rank else Item(Kind.COPY_DONE, item.seq, timings=item.timings)
        if not self.last:  # NOOP, STOP
            return item
        return None if tp_rank else Item(item.kind, item.seq, timings=item.timings)

    def map_pool(self, path: str, num_blocks: int, bytes_per_block: int) -> None:
        """Map a KV store's host pool (this rank's chunk of every block), if
        it is not the one mapped already: a restarted KV store makes a new one."""
        from fastserve.common.host_pool import HostKVPool
        from fastserve.common.schemas import PoolSpec

        spec = PoolSpec(path, num_blocks, bytes_per_block)
        if self.pool is not None and self.pool.spec == spec:
            return
        if bytes_per_block != self.engine.pool_bytes_per_block:
            raise ValueError(f"the pool has blocks of {bytes_per_block} bytes, this replica's are "
                             f"{self.engine.pool_bytes_per_block} (another model, dtype, block size or split?)")
        pool = HostKVPool.attach(spec)
        self.engine.set_host_pool(pool.tensor, num_blocks)
        old, self.pool = self.pool, pool
        if old is not None:
            old.close()

    def _tp_sync(self) -> None:
        """Wait until every TP rank of this stage got here (a CPU all-reduce:
        gloo also in an NCCL world, and no device work)."""
        if self.ctx.tensor_parallel_size > 1:
            import torch.distributed as dist

            dist.all_reduce(torch.zeros(1), group=self.ctx.tp_group)

    def serve(self) -> None:
        """Handle the leader's items until it stops the pipeline (every rank but the leader)."""
        assert self.source is not None, "the leader submits; it does not serve"
        if self.engine.device.type == "cuda":
            torch.cuda.set_device(self.engine.device)
        while True:
            item = self.source.recv()
            self.handle(item)
            if item.kind == Kind.STOP:
                break
        self.flush()

    def flush(self) -> None:
        for link in (self.next, self.reply):
            if link is not None:
                link.flush()
