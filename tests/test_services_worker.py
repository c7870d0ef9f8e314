"""The GPU worker service on the in-memory bus, driven by hand-written batch
commands: deltas only for running jobs, KV copies through the KV store's
shared-memory pool, errors reported instead of killing the worker."""
from __future__ import annotations

import asyncio
import uuid

import pytest

from fastserve.common import names
from fastserve.common.schemas import BatchCommand, BatchResult, KVCopy, KVCopyDone, decode, encode


class Replies:
    def __init__(self):
        self.q: asyncio.Queue = asyncio.Queue()

    async def handler(self, body, headers):
        self.q.put_nowait(decode(body))

    async def get(self, timeout=30.0):
        return await asyncio.wait_for(self.q.get(), timeout)


async def _worker(bus, model_dir, replica, host_blocks=0, pool_path=None):
    from fastserve.gpu_worker.service import WorkerService, WorkerServiceConfig

    cfg = WorkerServiceConfig(model=str(model_dir), replica=replica, gpu_kv_blocks=64,
                              host_kv_blocks=host_blocks, host_kv_path=pool_path, pool_wait=5)
    w = WorkerService(cfg, bus)
    await w.start()
    replies = Replies()
    await bus.declare_queue(names.scheduler_queue(replica), durable=False)
    await bus.consume(names.scheduler_queue(replica), replies.handler)
    return w, replies


def _greedy(model_dir, prompt, n):
    from fastserve.gpu_worker.llm import LLM
    from fastserve.common.sampling_params import SamplingParams

    out = LLM(str(model_dir), num_gpu_blocks=64).generate([prompt], SamplingParams(temperature=0.0, max_tokens=n))
    return out[0].token_ids


async def _decode_loop(bus, replica, replies, job, start_iter, n, table):
    """Feed `n` decode iterations of one job (deltas only); return the tokens.
    A new block is appended (block id 20, 21, ...) when the context outgrows the table."""
    toks = []
    for i in range(n):
        append = []
        if job["len"] > 16 * job["blocks"]:
            append = [20 + job["blocks"]]
            job["blocks"] += 1
        cmd = BatchCommand(replica=replica, iteration=start_iter + i,
                           run=[[job["id"], job["len"] - 1, 1, True, append, table if i == 0 else None]])
        await bus.publish(names.worker_queue(replica), encode(cmd))
        res = await replies.get()
        assert isinstance(res, BatchResult) and res.error is None, res
        toks.append(res.results[0][1])
        job["len"] += 1
    return toks


async def test_worker_runs_commands_with_deltas_like_the_engine(memory_bus, tiny_model_dir):
    replica = f"r{uuid.uuid4().hex[:6]}"
    prompt = [5, 17, 99, 3, 250] + list(range(100, 125))  # 30 tokens: 2 blocks
    expected = _greedy(tiny_model_dir, prompt, 6)
    w, replies = await _worker(memory_bus, tiny_model_dir, replica)
    try:
        sampling = {"temperature": 0.0, "max_tokens": 6}
        # Chunked prefill: 10 tokens without sampling, then the rest.
        cmd = BatchCommand(replica=replica, iteration=0, new=[["a", prompt, sampling]],
                           run=[["a", 0, 10, False, [3], None]])
        await memory_bus.publish(names.worker_queue(replica), encode(cmd))
        res = await replies.get()
        assert res.iteration == 0 and res.results == [] and res.error is None
        cmd = BatchCommand(replica=replica, iteration=1, run=[["a", 10, 20, True, [7], None]])
        await memory_bus.publish(names.worker_queue(replica), encode(cmd))
        res = await replies.get()
        toks = [res.results[0][1]]
        job = {"id": "a", "len": len(prompt) + 1, "blocks": 2}
        # A third block is appended as a delta when the context crosses 32 tokens.
        toks += await _decode_loop(memory_bus, replica, replies, job, 2, 5, None)
        assert toks == expected
        # A job the worker does not know is an error result, and the worker lives on.
        bad = BatchCommand(replica=replica, iteration=9, run=[["nope", 0, 1, True, [1], None]])
        await memory_bus.publish(names.worker_queue(replica), encode(bad))
        res = await replies.get()
        assert res.iteration == 9 and "nope" in res.error
        # A free-only command (an idle scheduler's) is applied without a step or a reply.
        assert "a" in w.seqs
        cmd = BatchCommand(replica=replica, iteration=-1, free=["a"])
        await memory_bus.publish(names.worker_queue(replica), encode(cmd))
        await asyncio.sleep(0.05)
        assert "a" not in w.seqs and replies.q.empty()
    finally:
        await w.stop()


async def test_worker_offload_and_upload_through_the_shared_pool(memory_bus, tiny_model_dir, tmp_path):
    from fastserve.common.host_pool import HostKVPool, PoolSpec, kv_bytes_per_block

    replica = f"r{uuid.uuid4().hex[:6]}"
    pool = HostKVPool.create(PoolSpec(str(tmp_path / "pool.bin"), 8, kv_bytes_per_block(tiny_model_dir, 16)))
    prompt = list(range(30, 50))  # 20 tokens: 2 blocks
    expected = _greedy(tiny_model_dir, prompt, 5)
    w, replies = await _worker(memory_bus, tiny_model_dir, replica, host_blocks=8, pool_path=pool.spec.path)
    try:
        done = Replies()
        await memory_bus.declare_queue("test.kv", durable=False)
        await memory_bus.consume("test.kv", done.handler)
        cmd = BatchCommand(replica=replica, iteration=0, new=[["j", prompt, {"temperature": 0.0, "max_tokens": 5}]],
                           run=[["j", 0, 20, True, [0, 1], None]])
        await memory_bus.publish(names.worker_queue(replica), encode(cmd))
        toks = [(await replies.get()).results[0][1]]
        job = {"id": "j", "len": 21, "blocks": 2}
        toks += await _decode_loop(memory_bus, replica, replies, job, 1, 1, None)
        # Offload the two blocks to host blocks 5, 6; wipe the GPU blocks; upload into 10, 11.
        for direction, src, dst in (("offload", [0, 1], [5, 6]), ("upload", [5, 6], [10, 11])):
            copy = KVCopy(replica=replica, copy_id=direction, job_id="j", direction=direction, src_blocks=src,
                          dst_blocks=dst, after_iteration=1, reply_to="test.kv")
            await memory_bus.publish(names.worker_queue(replica), encode(copy))
            rep = await done.get()
            assert isinstance(rep, KVCopyDone) and rep.error is None and rep.copy_id == direction
            if direction == "offload":
                assert pool.block_view()[5].any().item()  # the worker wrote our shared pages
                w.engine.kv.gpu.zero_()
        toks += await _decode_loop(memory_bus, replica, replies, job, 2, 3, [10, 11])
        assert toks == expected
    finally:
        await w.stop()
        pool.close()
