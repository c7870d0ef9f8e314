"""The GPU worker service on the in-memory bus, driven by hand-written batch
commands: deltas only for running jobs, a decode job fed its own sampled
token in consecutive commands, epochs, KV copies through a KV store's
shared-memory pool, and one job's error never touching another's."""
from __future__ import annotations

import asyncio
import uuid

from fastserve.common import names
from fastserve.common.sampling_params import SamplingParams
from fastserve.common.schemas import (
    BatchCommand, BatchResult, KVCopy, KVCopyDone, NewJob, RunEntry, decode, encode,
)

GREEDY = SamplingParams(temperature=0.0, max_tokens=64)


class Replies:
    def __init__(self):
        self.q: asyncio.Queue = asyncio.Queue()

    async def handler(self, body, headers):
        self.q.put_nowait(decode(body))

    async def get(self, timeout=30.0, kind=None):
        while True:
            msg = await asyncio.wait_for(self.q.get(), timeout)
            if kind is None or isinstance(msg, kind):
                return msg


async def _worker(bus, model_dir, replica):
    from fastserve.gpu_worker.service import WorkerService, WorkerServiceConfig

    w = WorkerService(WorkerServiceConfig(model=str(model_dir), replica=replica, gpu_kv_blocks=64), bus)
    await w.start()
    replies = Replies()
    await bus.consume(names.scheduler_queue(replica), replies.handler)
    return w, replies


def _greedy(model_dir, prompt, n):
    from fastserve.llm import LLM

    out = LLM(str(model_dir), num_gpu_blocks=64).generate([prompt], SamplingParams(temperature=0.0, max_tokens=n))
    return out[0].token_ids


async def _send(bus, w, cmd):
    await bus.publish(w.queue, encode(cmd))


async def test_commands_with_deltas_and_in_flight_decodes_match_the_engine(memory_bus, tiny_model_dir):
    replica = f"r{uuid.uuid4().hex[:6]}"
    prompt = [5, 17, 99, 3, 250] + list(range(100, 125))  # 30 tokens: 2 blocks
    expected = _greedy(tiny_model_dir, prompt, 6)
    w, replies = await _worker(memory_bus, tiny_model_dir, replica)
    try:
        # Chunked prefill: 10 tokens without sampling, then the rest.
        await _send(memory_bus, w, BatchCommand(replica, 0, 0, new=[NewJob("a", "t", prompt, GREEDY)],
                                                run=[RunEntry("a", 0, 10, False, append_blocks=[3])]))
        res = await replies.get()
        assert res.iteration == 0 and res.tokens == [] and res.error is None
        await _send(memory_bus, w, BatchCommand(replica, 0, 1, run=[RunEntry("a", 10, 20, True, append_blocks=[7])]))
        # Sent before iteration 1's result is back: the worker feeds `a` the
        # token iteration 1 samples (asynchronous iterations).
        for it, pos in ((2, 30), (3, 31), (4, 32), (5, 33), (6, 34)):
            append = [9] if pos == 32 else []  # a third block once the context passes 32 tokens
            await _send(memory_bus, w, BatchCommand(replica, 0, it, run=[RunEntry("a", pos, 1, True,
                                                                                  append_blocks=append)]))
        toks = []
        for it in range(1, 7):
            res = await replies.get()
            assert isinstance(res, BatchResult) and res.iteration == it and res.error is None, res
            toks.append(res.tokens[0].token_id)
        assert toks == expected
        # A free-only command (an idle scheduler's) is applied without a step or a reply.
        assert "a" in w.seqs
        await _send(memory_bus, w, BatchCommand(replica, 0, -1, free=["a"]))
        await asyncio.sleep(0.05)
        assert "a" not in w.seqs and replies.q.empty()
    finally:
        await w.stop()


async def test_one_jobs_error_leaves_the_others_running(memory_bus, tiny_model_dir):
    replica = f"r{uuid.uuid4().hex[:6]}"
    w, replies = await _worker(memory_bus, tiny_model_dir, replica)
    vocab = w.engine.model_config.vocab_size
    try:
        bad_topk = SamplingParams(temperature=1.0, top_k=2**40, max_tokens=4)
        cmd = BatchCommand(replica, 0, 0, new=[NewJob("ok", "t", [1, 2, 3], GREEDY),
                                               NewJob("topk", "t", [1, 2, 3], bad_topk),
                                               NewJob("tok", "t", [1, vocab + 5], GREEDY)],
                           run=[RunEntry("ok", 0, 3, True, append_blocks=[0]),
                                RunEntry("topk", 0, 3, True, append_blocks=[1]),
                                RunEntry("tok", 0, 2, True, append_blocks=[2])])
        await _send(memory_bus, w, cmd)
        res = await replies.get()
        assert res.error is None
        by_job = {t.job_id: t for t in res.tokens}
        assert by_job["ok"].error is None and 0 <= by_job["ok"].token_id < vocab
        assert "top_k" in by_job["topk"].error
        assert "vocabulary" in by_job["tok"].error
        assert set(w.seqs) == {"ok"}
    finally:
        await w.stop()


async def test_a_new_epoch_forgets_every_job_and_older_commands_are_dropped(memory_bus, tiny_model_dir):
    replica = f"r{uuid.uuid4().hex[:6]}"
    w, replies = await _worker(memory_bus, tiny_model_dir, replica)
    try:
        await _send(memory_bus, w, BatchCommand(replica, 0, 0, new=[NewJob("a", "t", [1, 2, 3], GREEDY)],
                                                run=[RunEntry("a", 0, 3, True, append_blocks=[0])]))
        assert (await replies.get()).tokens[0].error is None
        await _send(memory_bus, w, BatchCommand(replica, 1, 1, new=[NewJob("b", "t", [4, 5], GREEDY)],
                                                run=[RunEntry("b", 0, 2, True, append_blocks=[1])]))
        res = await replies.get()
        assert res.epoch == 1 and res.tokens[0].job_id == "b" and set(w.seqs) == {"b"}
        await _send(memory_bus, w, BatchCommand(replica, 0, 2, run=[RunEntry("a", 3, 1, True)]))  # stale
        await asyncio.sleep(0.1)
        assert replies.q.empty() and (w.epoch, w.received, w.completed) == (1, 1, 1)
    finally:
        await w.stop()


async def test_offload_and_upload_through_a_kv_store_pool(memory_bus, tiny_model_dir, tmp_path):
    from fastserve.common.host_pool import HostKVPool, PoolSpec, kv_bytes_per_block

    replica = f"r{uuid.uuid4().hex[:6]}"
    spec = PoolSpec(str(tmp_path / "fastserve-kv-test.bin"), 8, kv_bytes_per_block(tiny_model_dir, 16))
    pool = HostKVPool.create(spec)
    prompt = list(range(30, 50))  # 20 tokens: 2 blocks
    expected = _greedy(tiny_model_dir, prompt, 5)
    w, replies = await _worker(memory_bus, tiny_model_dir, replica)
    done = Replies()
    await memory_bus.declare_queue("test.kv", durable=False, bindings=[(names.KV_EXCHANGE, names.kv_done_key(replica))])
    await memory_bus.consume("test.kv", done.handler)
    try:
        await _send(memory_bus, w, BatchCommand(replica, 0, 0, new=[NewJob("j", "t", prompt, GREEDY)],
                                                run=[RunEntry("j", 0, 20, True, append_blocks=[0, 1])]))
        toks = [(await replies.get()).tokens[0].token_id]
        await _send(memory_bus, w, BatchCommand(replica, 0, 1, run=[RunEntry("j", 20, 1, True)]))
        toks.append((await replies.get()).tokens[0].token_id)
        # Offload the two blocks to host blocks 5, 6; wipe the GPU; upload them into 10, 11.
        for move_id, direction, gpu in ((1, "offload", [0, 1]), (2, "upload", [10, 11])):
            await _send(memory_bus, w, KVCopy(replica, move_id, "j", direction, gpu, [5, 6], spec))
            rep = await done.get()
            assert isinstance(rep, KVCopyDone) and rep.error is None and rep.move_id == move_id
            if direction == "offload":
                assert pool.block_view()[5].any().item()  # the worker wrote our shared pages
                w.engine.kv.gpu.zero_()
        for it, pos in ((2, 21), (3, 22), (4, 23)):
            table = [10, 11] if it == 2 else None
            await _send(memory_bus, w, BatchCommand(replica, 0, it, run=[RunEntry("j", pos, 1, True,
                                                                                  block_table=table)]))
            toks.append((await replies.get(kind=BatchResult)).tokens[0].token_id)
        assert toks == expected
        # A copy for a pool that is gone fails alone: reported, nothing else changes.
        gone = PoolSpec(str(tmp_path / "fastserve-kv-gone.bin"), 8, spec.bytes_per_block)
        await _send(memory_bus, w, KVCopy(replica, 3, "j", "offload", [10, 11], [0, 1], gone))
        rep = await done.get()
        assert rep.move_id == 3 and "missing" in rep.error
        # A copy published twice (its confirm lost) runs once: by the time the
        # second arrives its blocks may belong to another job.
        await _send(memory_bus, w, KVCopy(replica, 2, "j", "upload", [10, 11], [5, 6], spec))
        await asyncio.sleep(0.1)
        assert done.q.empty() and w.stats["duplicate_copies"] == 1
    finally:
        await w.stop()
        pool.close()


async def test_a_job_the_worker_never_got_makes_the_scheduler_start_over(memory_bus, tiny_model_dir):
    """A command that registered a job was lost (a broker restart): the next
    one names a job the worker does not hold. The worker says so, instead of
    failing the job, and runs nothing of that command."""
    replica = f"r{uuid.uuid4().hex[:6]}"
    w, replies = await _worker(memory_bus, tiny_model_dir, replica)
    try:
        await _send(memory_bus, w, BatchCommand(replica, 0, 0, new=[NewJob("a", "t", [1, 2, 3], GREEDY)],
                                                run=[RunEntry("a", 0, 3, True, append_blocks=[0]),
                                                     RunEntry("lost", 0, 1, True, append_blocks=[1])]))
        res = await replies.get(kind=BatchResult)
        assert res.unknown_jobs == ["lost"] and res.tokens == [] and res.error is None
        assert w.seqs["a"].pending == 0 and w.seqs["a"].tokens == [1, 2, 3]
    finally:
        await w.stop()


async def test_a_command_published_twice_runs_once(memory_bus, tiny_model_dir):
    """A publish retried after its confirm was lost (broker restart) arrives
    twice: running it again would sample a token the scheduler never counts,
    and the next command would not match the worker's tokens."""
    replica = f"r{uuid.uuid4().hex[:6]}"
    w, replies = await _worker(memory_bus, tiny_model_dir, replica)
    try:
        first = BatchCommand(replica, 0, 0, new=[NewJob("a", "t", [1, 2, 3], GREEDY)],
                             run=[RunEntry("a", 0, 3, True, append_blocks=[0])])
        await _send(memory_bus, w, first)
        assert (await replies.get()).tokens[0].error is None
        await _send(memory_bus, w, first)  # the duplicate
        await _send(memory_bus, w, BatchCommand(replica, 0, 1, run=[RunEntry("a", 3, 1, True)]))
        res = await replies.get(kind=BatchResult)
        assert res.iteration == 1 and res.tokens[0].error is None, res
        assert len(w.seqs["a"].tokens) == 5 and w.stats["duplicate_commands"] == 1
        await asyncio.sleep(0.1)
        assert replies.q.empty()  # no second result for iteration 0
    finally:
        await w.stop()
