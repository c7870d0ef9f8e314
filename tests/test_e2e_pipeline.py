"""A replica split over worker processes (pipeline stages, tensor-parallel
ranks: torch.distributed, gloo on the CPU) served end to end: the outputs are
those of one worker, with KV offloaded and uploaded by every rank through the
KV store's pool; a rank that dies takes the replica's GPU KV with it and its
jobs continue, unchanged, once `fastserve up` has started the group again."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from fastserve.common.bus_memory import MemoryBus
from fastserve.launcher import NodeConfig, Stack
from test_services_stack import Client, offline_greedy, prompts, until

pytestmark = pytest.mark.timeout(600)


def node(model_dir, tmp_path, **kw) -> NodeConfig:
    return NodeConfig(model=str(model_dir), replica=f"pp{uuid.uuid4().hex[:6]}", gpu_kv_blocks=24,
                      host_kv_blocks=96, host_kv_dir=str(tmp_path), **kw)


@pytest.mark.parametrize("P,T", [(2, 1), (1, 2), (2, 2)])
async def test_a_split_replica_serves_like_one_worker_through_offloads(tiny_model_dir, tmp_path, P, T):
    ps = prompts(12, 20, seed=7)
    expected = offline_greedy(tiny_model_dir, ps, 30)
    bus = MemoryBus()
    await bus.connect()
    stack = await Stack(node(tiny_model_dir, tmp_path, pipeline_parallel_size=P, tensor_parallel_size=T), bus,
                        services=("kvstore", "worker", "scheduler")).start()
    try:
        assert len(stack.ranks) == P * T - 1
        client = await Client(bus).start()
        ids = [await client.submit(p, 30, ignore_eos=True) for p in ps]
        for i, job_id in enumerate(ids):
            ev = await client.wait(job_id, timeout=300)
            assert ev.error is None, ev.error
            assert client.tokens[job_id] == expected[i], i
        core = stack.scheduler.core
        # 12 jobs of 4 blocks in a 24-block pool: KV went to the host and back, on every rank.
        assert core.stats.offloads > 0 and core.stats.uploads > 0
        if P > 1:  # P batches in the pipeline at once, jobs P iterations apart
            assert core.config.reschedule_gap == P and stack.scheduler.times.back_to_back > 0
    finally:
        await stack.stop()
        await bus.close()


async def test_a_dead_rank_costs_recompute_not_tokens(tiny_model_dir, tmp_path):
    ps = prompts(6, 20, seed=8)
    expected = offline_greedy(tiny_model_dir, ps, 60)
    bus = MemoryBus()
    await bus.connect()
    stack = await Stack(node(tiny_model_dir, tmp_path, pipeline_parallel_size=2, worker_timeout=3.0), bus,
                        services=("kvstore", "worker", "scheduler")).start()
    stop = asyncio.Event()
    supervisor = asyncio.create_task(stack.supervise(stop, interval=0.2))
    try:
        client = await Client(bus).start()
        ids = [await client.submit(p, 60, ignore_eos=True) for p in ps]
        await until(lambda: all(len(client.tokens.get(j, [])) >= 5 for j in ids), 3000)
        first = stack.ranks[0]
        first.send_signal(signal.SIGKILL)
        for i, job_id in enumerate(ids):
            ev = await client.wait(job_id, timeout=300)
            assert ev.error is None, ev.error
            assert client.tokens[job_id] == expected[i], i
        assert stack.ranks and stack.ranks[0] is not first  # the group was started again
        assert stack.scheduler.epoch >= 1 and stack.scheduler.core.stats.recomputed >= 1
    finally:
        stop.set()
        await supervisor
        await stack.stop()
        await bus.close()


def test_openai_client_against_fastserve_up_with_two_stages_on_rabbitmq(rabbitmq_url, tiny_model_dir, tmp_path):
    """`fastserve up --pipeline-parallel-size 2 --broker amqp://...`, as a user runs it."""
    import openai
    from test_e2e_openai import fastserve_generate, free_port
    from test_gateway_cli import _get

    port = free_port()
    env = {**os.environ, "FASTSERVE_NAMESPACE": f"pp-{uuid.uuid4().hex[:8]}", "FASTSERVE_HOST_KV_DIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "fastserve.cli", "up", "--model", str(tiny_model_dir),
                             "--port", str(port), "--broker", rabbitmq_url, "--pipeline-parallel-size", "2",
                             "--gpu-kv-blocks", "64", "--host-kv-blocks", "64"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if _get(base + "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "fastserve up never became healthy"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        model = client.models.list().data[0].id
        for prompt in ("the quick brown fox", "a B c"):
            want = fastserve_generate(tiny_model_dir, prompt, 12)
            r = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
            assert r.choices[0].text == want["text"]
        stream = client.completions.create(model=model, prompt="the quick brown fox", max_tokens=12,
                                           temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in stream if c.choices) == fastserve_generate(
            tiny_model_dir, "the quick brown fox", 12)["text"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0, proc.stderr.read().decode()[-3000:]
