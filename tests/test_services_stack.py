"""Scheduler + worker + KV store on one bus, driven through the job queue
directly (no HTTP): greedy outputs equal the offline engine's, preemption is
real, offload/upload under a tiny GPU pool changes no token, cancels free KV,
malformed messages are dead-lettered while the services keep serving."""
from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from fastserve.common import names
from fastserve.common.sampling_params import SamplingParams
from fastserve.common.schemas import JobCancel, JobSubmit, TokenBatch, TokenEvent, decode, encode
from fastserve.launcher import NodeConfig, Stack


class Client:
    """Submits jobs like a gateway and collects their token events."""

    def __init__(self, bus):
        self.bus = bus
        self.reply = names.reply_queue(f"test-{uuid.uuid4().hex[:8]}")
        self.tokens: dict[str, list[int]] = {}
        self.final: dict[str, TokenEvent] = {}
        self.done_at: dict[str, float] = {}
        self.first_at: dict[str, float] = {}
        self._done: dict[str, asyncio.Event] = {}

    async def start(self):
        await self.bus.declare_queue(self.reply, durable=False, exclusive=True, auto_delete=True)
        await self.bus.consume(self.reply, self._on_event)
        return self

    async def _on_event(self, body, headers):
        for ev in decode(body, TokenBatch).events:
            self.tokens.setdefault(ev.job_id, []).extend(ev.token_ids)
            if ev.token_ids:
                self.first_at.setdefault(ev.job_id, time.monotonic())
            if ev.finished:
                self.final[ev.job_id] = ev
                self.done_at[ev.job_id] = time.monotonic()
                self._done.setdefault(ev.job_id, asyncio.Event()).set()

    async def submit(self, prompt: list[int], max_tokens: int, job_id: str | None = None, **sampling) -> str:
        job_id = job_id or uuid.uuid4().hex[:10]
        self._done.setdefault(job_id, asyncio.Event())
        msg = JobSubmit(job_id=job_id, trace_id=f"t-{job_id}", reply_to=self.reply, prompt_token_ids=prompt,
                        sampling=SamplingParams(**{"temperature": 0.0, "max_tokens": max_tokens, **sampling}),
                        arrival_time=time.time(), model="tiny")
        await self.bus.publish(names.JOB_QUEUE, encode(msg))
        return job_id

    async def wait(self, job_id: str, timeout: float = 60.0) -> TokenEvent:
        await asyncio.wait_for(self._done.setdefault(job_id, asyncio.Event()).wait(), timeout)
        return self.final[job_id]


async def until(cond, tries: int) -> None:
    """Poll cond() every 10 ms, at most `tries` times; the assert after the call says what is expected."""
    for _ in range(tries):
        if cond():
            return
        await asyncio.sleep(0.01)


def prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, 1000) for _ in range(length)] for _ in range(n)]


def offline_greedy(model_dir, prompt_list, max_tokens) -> list[list[int]]:
    from fastserve.llm import LLM
    from fastserve.common.sampling_params import SamplingParams

    llm = LLM(str(model_dir), num_gpu_blocks=256)
    outs = llm.generate(prompt_list, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    return [o.token_ids for o in outs]


def node(model_dir, tmp_path, **kw) -> NodeConfig:
    kw.setdefault("gpu_kv_blocks", 64)
    kw.setdefault("host_kv_blocks", 64)
    return NodeConfig(model=str(model_dir), replica=f"r{uuid.uuid4().hex[:6]}", host_kv_dir=str(tmp_path), **kw)


@pytest.fixture
async def stack_factory():
    stacks = []

    async def make(cfg: NodeConfig, bus) -> Stack:
        s = Stack(cfg, bus, services=("kvstore", "worker", "scheduler"))
        stacks.append(s)
        return await s.start()

    yield make
    for s in stacks:
        await s.stop()


@pytest.mark.parametrize("in_flight", [1, 2])
async def test_greedy_outputs_equal_the_offline_engine(bus, stack_factory, tiny_model_dir, tmp_path, in_flight):
    ps = prompts(5, 12) + prompts(2, 40, seed=1)
    expected = offline_greedy(tiny_model_dir, ps, 10)
    s = await stack_factory(node(tiny_model_dir, tmp_path, max_batches_in_flight=in_flight), bus)
    client = await Client(bus).start()
    ids = [await client.submit(p, 10, ignore_eos=True) for p in ps]
    for i, job_id in enumerate(ids):
        ev = await client.wait(job_id)
        assert ev.error is None and ev.finish_reason == "length"
        assert ev.num_prompt_tokens == len(ps[i]) and ev.num_generated == 10
        assert client.tokens[job_id] == expected[i]
    # Every decision gets settled (none left outstanding in the core), idle ones too.
    await until(lambda: s.scheduler.core.num_outstanding == 0 and not s.scheduler._inflight, 100)
    assert s.scheduler.core.num_outstanding == 0 and not s.scheduler._inflight
    if in_flight == 2:  # the next iteration was planned while one ran, and decode jobs were in both
        assert s.scheduler.times.back_to_back > 0


async def test_offload_and_upload_under_a_tiny_gpu_pool_change_no_token(bus, stack_factory,
                                                                         tiny_model_dir, tmp_path):
    # 12 jobs of up to 3 blocks each in a 12-block GPU pool: most must wait on host.
    ps = prompts(12, 20, seed=2)
    expected = offline_greedy(tiny_model_dir, ps, 24)
    s = await stack_factory(node(tiny_model_dir, tmp_path, gpu_kv_blocks=12, host_kv_blocks=48), bus)
    client = await Client(bus).start()
    ids = [await client.submit(p, 24, ignore_eos=True) for p in ps]
    for i, job_id in enumerate(ids):
        ev = await client.wait(job_id)
        assert ev.error is None, ev.error
        assert client.tokens[job_id] == expected[i], i
    assert s.scheduler.core.stats.offloads > 0 and s.scheduler.core.stats.uploads > 0
    assert s.kvstore.stats["offloads"] == s.scheduler.core.stats.offloads
    await until(lambda: s.kvstore.table.blocks_used == 0, 200)  # the last frees travel with the next plan
    assert s.scheduler.core.gpu_blocks_used() == 0 and s.scheduler.core.host_blocks_used() == 0


@pytest.mark.parametrize("policy", ["sj-mlfq", "fcfs"])
async def test_short_jobs_after_a_long_one(bus, stack_factory, tiny_model_dir, tmp_path, policy):
    """sj-mlfq preempts the long job for shorts sent just after it; fcfs runs it to completion.
    A batch of one job per iteration makes the order the policy's alone."""
    await stack_factory(node(tiny_model_dir, tmp_path, policy=policy, max_batch_size=1), bus)
    client = await Client(bus).start()
    long_id = await client.submit(prompts(1, 8, seed=3)[0], 120, ignore_eos=True)
    await asyncio.sleep(0.05)  # the long job is running
    shorts = [await client.submit(p, 4, ignore_eos=True) for p in prompts(3, 8, seed=4)]
    for j in [long_id, *shorts]:
        assert (await client.wait(j)).error is None
    shorts_before_long = sum(client.done_at[j] < client.done_at[long_id] for j in shorts)
    if policy == "sj-mlfq":
        assert shorts_before_long == 3
    else:
        assert shorts_before_long == 0


async def test_cancel_frees_kv_and_bad_messages_go_to_the_dead_letter_queue(bus, stack_factory,
                                                                            tiny_model_dir, tmp_path):
    s = await stack_factory(node(tiny_model_dir, tmp_path), bus)
    client = await Client(bus).start()
    job = await client.submit(prompts(1, 30)[0], 400, ignore_eos=True)
    await until(lambda: client.tokens.get(job), 200)
    assert s.scheduler.core.gpu_blocks_used() > 0
    await bus.publish(names.CANCEL_KEY, encode(JobCancel(job_id=job, trace_id="t")),
                             exchange=names.CONTROL_EXCHANGE)
    await until(lambda: s.scheduler.core.gpu_blocks_used() == 0 and job not in s.worker.seqs, 200)
    assert s.scheduler.core.gpu_blocks_used() == 0 and not s.scheduler.jobs.num_unfinished()
    assert job not in client.final  # a cancelled job gets no more events
    # Garbage on every queue the backend consumes: dead-lettered, services keep running.
    dead = []
    await bus.consume(names.DEAD_LETTER_QUEUE, lambda b, h: _append(dead, b))
    for q in (names.JOB_QUEUE, names.scheduler_queue(s.cfg.replica), s.worker.queue, s.kvstore.queue):
        await bus.publish(q, b"\x93not a message")
    bad = JobSubmit(job_id="x", trace_id="t", reply_to=client.reply, prompt_token_ids=[1],
                    sampling=SamplingParams(), arrival_time=0.0, model="m")
    raw = encode(bad).replace(b"prompt_token_ids", b"prompt_token_idz")
    await bus.publish(names.JOB_QUEUE, raw)
    await until(lambda: len(dead) == 5, 100)
    assert len(dead) == 5
    # The malformed job's sender is told why, not left waiting.
    assert "prompt_token_ids" in (await client.wait("x")).error
    p = prompts(1, 10, seed=9)[0]
    ok = await client.submit(p, 5, ignore_eos=True)
    assert client.tokens.get(ok) is None
    assert (await client.wait(ok)).finish_reason == "length"
    assert client.tokens[ok] == offline_greedy(tiny_model_dir, [p], 5)[0]


async def _append(lst, item):
    lst.append(item)


async def test_impossible_jobs_get_a_clear_error(memory_bus, stack_factory, tiny_model_dir, tmp_path):
    await stack_factory(node(tiny_model_dir, tmp_path), memory_bus)
    client = await Client(memory_bus).start()
    too_long = await client.submit([5] * 500, 100)  # tiny: 512-token context
    ev = await client.wait(too_long)
    assert "exceeds" in ev.error and "512" in ev.error
    bad_ids = await client.submit([5, 10**6], 4)
    assert "out of range" in (await client.wait(bad_ids)).error
    bad_topk = await client.submit([5, 6], 4, top_k=2**40, temperature=1.0)
    assert "top_k" in (await client.wait(bad_topk)).error


async def test_a_vanished_gateway_gets_its_jobs_cancelled(rabbit_bus, rabbitmq_url, bus_namespace, stack_factory,
                                                          tiny_model_dir, tmp_path):
    """The client's connection (its exclusive reply queue) goes away mid-job:
    the scheduler's next token publish is unroutable and it cancels the job."""
    from fastserve.common.bus_rabbit import RabbitBus

    s = await stack_factory(node(tiny_model_dir, tmp_path), rabbit_bus)
    gw_bus = RabbitBus(rabbitmq_url, namespace=bus_namespace, connection_name="pytest-gone-gateway")
    await gw_bus.connect()
    client = await Client(gw_bus).start()
    job = await client.submit(prompts(1, 20)[0], 400, ignore_eos=True)
    await until(lambda: client.tokens.get(job), 300)
    assert s.scheduler.jobs.num_unfinished() == 1
    await gw_bus.close()  # the exclusive reply queue goes with the connection
    await until(lambda: not s.scheduler.jobs.num_unfinished() and s.scheduler.core.gpu_blocks_used() == 0, 300)
    assert s.scheduler.jobs.num_unfinished() == 0 and s.scheduler.core.gpu_blocks_used() == 0
    assert s.scheduler.core.stats.cancelled == 1 and s.scheduler.core.stats.finished == 0


async def test_a_lost_worker_is_replaced_and_its_jobs_continue_unchanged(memory_bus, stack_factory,
                                                                          tiny_model_dir, tmp_path):
    """The worker dies mid-generation (its KV with it); a new one starts: the
    jobs continue by recompute and their tokens are those of an undisturbed run."""
    from fastserve.gpu_worker.service import WorkerService

    ps = prompts(3, 20, seed=5)
    expected = offline_greedy(tiny_model_dir, ps, 40)
    s = await stack_factory(node(tiny_model_dir, tmp_path, worker_timeout=2.0), memory_bus)
    client = await Client(memory_bus).start()
    ids = [await client.submit(p, 40, ignore_eos=True) for p in ps]
    await until(lambda: all(len(client.tokens.get(j, [])) >= 5 for j in ids), 500)
    await s.worker.stop()  # gone: no more heartbeats, its queue deleted
    await asyncio.sleep(0.5)
    fresh = WorkerService(s.cfg.worker_config(), memory_bus)
    await fresh.start()
    try:
        for i, job_id in enumerate(ids):
            ev = await client.wait(job_id, timeout=60)
            assert ev.error is None, ev.error
            assert client.tokens[job_id] == expected[i], i
        assert s.scheduler.epoch >= 1 and s.scheduler.core.stats.recomputed >= 1
    finally:
        await fresh.stop()


async def test_jobs_fail_with_an_error_when_no_worker_comes_back(memory_bus, stack_factory, tiny_model_dir, tmp_path):
    s = await stack_factory(node(tiny_model_dir, tmp_path, worker_timeout=1.5, worker_grace=1.0), memory_bus)
    client = await Client(memory_bus).start()
    job = await client.submit(prompts(1, 20)[0], 400, ignore_eos=True)
    await until(lambda: client.tokens.get(job), 300)
    await s.worker.stop()
    ev = await client.wait(job, timeout=20)
    assert ev.finish_reason is None and "no worker" in ev.error
    assert s.scheduler.jobs.num_unfinished() == 0 and s.scheduler.core.gpu_blocks_used() == 0


async def test_a_lost_kv_store_costs_host_copies_not_tokens(memory_bus, stack_factory, tiny_model_dir, tmp_path):
    """Under KV pressure jobs sit on the host; the KV store dies and a new one
    (a new pool) starts: swapped jobs recompute, every output is unchanged."""
    from fastserve.kvstore.service import KVStoreService

    ps = prompts(12, 20, seed=2)
    expected = offline_greedy(tiny_model_dir, ps, 24)
    s = await stack_factory(node(tiny_model_dir, tmp_path, gpu_kv_blocks=12, host_kv_blocks=48,
                                 kvstore_timeout=1.5), memory_bus)
    client = await Client(memory_bus).start()
    ids = [await client.submit(p, 24, ignore_eos=True) for p in ps]
    await until(lambda: s.scheduler.core.host_blocks_used() > 0, 1000)
    assert s.scheduler.core.host_blocks_used() > 0
    old_pool = s.kvstore.pool.spec.path
    await s.kvstore.stop()
    fresh = KVStoreService(s.cfg.kvstore_config(), memory_bus)
    await fresh.start()
    assert fresh.pool.spec.path != old_pool
    try:
        for i, job_id in enumerate(ids):
            ev = await client.wait(job_id, timeout=90)
            assert ev.error is None, ev.error
            assert client.tokens[job_id] == expected[i], i
        assert s.scheduler.core.stats.recomputed >= 1
    finally:
        await fresh.stop()


async def test_a_submission_published_twice_runs_once(memory_bus, stack_factory, tiny_model_dir, tmp_path):
    """The gateway's publish retried after its confirm was lost arrives twice,
    maybe after the job finished: the scheduler must not run it again."""
    s = await stack_factory(node(tiny_model_dir, tmp_path), memory_bus)
    client = await Client(memory_bus).start()
    p = prompts(1, 10, seed=3)[0]
    job = await client.submit(p, 4, ignore_eos=True)
    assert (await client.wait(job)).finish_reason == "length"
    steps = s.worker.stats["steps"]
    await client.submit(p, 4, job_id=job, ignore_eos=True)  # the duplicate
    other = await client.submit(p, 4, ignore_eos=True)
    await client.wait(other)
    assert client.tokens[job] == client.tokens[other] == offline_greedy(tiny_model_dir, [p], 4)[0]
    assert not s.scheduler.jobs.num_unfinished() and s.scheduler.core.num_jobs == 0
    assert s.worker.stats["steps"] - steps == 4  # the other job's steps only
