"""The public submission queue (docs/queue.md) end to end: msgpack and JSON
requests, idempotent request ids, token events, deadlines, malformed messages
dead-lettered with their reason; on RabbitMQ, 200 requests through
fastserve.client while the scheduler and the worker are each killed once:
exactly 200 results, each once, greedy outputs equal to the offline engine's."""
from __future__ import annotations

import asyncio
import time
import uuid

import aio_pika
import orjson
import pytest

from fastserve.common import names
from fastserve.common.bus import JSON, Properties
from fastserve.common.schemas import (
    RequestTokens, SubmitRequest, SubmitResult, decode, decode_json, encode, encode_json,
)
from fastserve.launcher import NodeConfig, Stack
from test_services_stack import offline_greedy, prompts

pytestmark = pytest.mark.timeout(300)


def node(model_dir, tmp_path, **kw) -> NodeConfig:
    kw.setdefault("gpu_kv_blocks", 64)
    kw.setdefault("host_kv_blocks", 0)
    kw.setdefault("kv_policy", "recompute")
    kw.setdefault("database", f"sqlite:///{tmp_path}/fastserve.db")
    return NodeConfig(model=str(model_dir), served_model_name="tiny", replica=f"r{uuid.uuid4().hex[:6]}",
                      host_kv_dir=str(tmp_path), **kw)


def served_text(model_dir, prompt, ids) -> str:
    """The text the gateway makes of these output tokens (detokenized after the prompt)."""
    from fastserve.common.schemas import TokenEvent
    from fastserve.gateway.model_info import ModelInfo
    from fastserve.gateway.output import ChoiceOutput

    c = ChoiceOutput(0, ModelInfo.load(model_dir, "tiny"), prompt, [])
    c.add(TokenEvent("j", ids, finish_reason="length", num_generated=len(ids)))
    return c.output_text


def completion(prompt, max_tokens=8, **kw) -> dict:
    return {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **kw}


class Replies:
    """A reply queue on the bus, decoding whatever comes (msgpack or JSON)."""

    def __init__(self, bus):
        self.bus = bus
        self.name = f"replies-{uuid.uuid4().hex[:8]}"
        self.items: asyncio.Queue = asyncio.Queue()

    async def start(self) -> Replies:
        await self.bus.declare_queue(self.name, durable=False, exclusive=True, auto_delete=True)
        await self.bus.consume_deliveries(self.name, self._on)
        return self

    async def _on(self, d):
        msg = decode_json(d.body) if d.props.content_type == JSON else decode(d.body)
        await self.items.put((msg, d.props))

    async def next(self, timeout=60.0):
        return await asyncio.wait_for(self.items.get(), timeout)

    async def send(self, msg: SubmitRequest, as_json=False, **props):
        await self.bus.publish(names.SUBMIT_QUEUE, encode_json(msg) if as_json else encode(msg), props=Properties(
            content_type=JSON if as_json else "application/msgpack", reply_to=self.bus.full_name(self.name),
            **props))


@pytest.fixture
async def stack(memory_bus, tiny_model_dir, tmp_path):
    s = await Stack(node(tiny_model_dir, tmp_path), memory_bus, serve_http=False).start()
    yield s
    await s.stop()


async def test_msgpack_and_json_requests_get_their_results_and_ids_run_once(stack, memory_bus, tiny_model_dir):
    replies = await Replies(memory_bus).start()
    ps = prompts(2, 10, seed=3)
    expected = offline_greedy(tiny_model_dir, ps, 8)
    await replies.send(SubmitRequest("a", "/v1/completions", completion(ps[0])))
    await replies.send(SubmitRequest("b", "/v1/completions", completion(ps[1])), as_json=True)
    got = {}
    for _ in range(2):
        msg, props = await replies.next()
        got[msg.request_id] = (msg, props)
    a, a_props = got["a"]
    b, b_props = got["b"]
    assert (a_props.content_type, b_props.content_type) == ("application/msgpack", JSON)
    assert a_props.correlation_id == "a" and isinstance(a, SubmitResult) and a.status == 200
    assert a.token_ids == [expected[0]] and b.token_ids == [expected[1]]
    assert a.response["choices"][0]["finish_reason"] == "length" and a.response["usage"]["completion_tokens"] == 8
    assert a.response["choices"][0]["text"] == served_text(tiny_model_dir, ps[0], expected[0])
    assert a.timings.total > 0 and a.timings.first_token is not None
    # The same id again (another prompt even): not run again, the stored result comes back.
    finished = stack.scheduler.core.stats.finished
    await replies.send(SubmitRequest("a", "/v1/completions", completion(ps[1])))
    again, _ = await replies.next()
    assert again.request_id == "a" and again.token_ids == [expected[0]]
    assert stack.scheduler.core.stats.finished == finished


async def test_batch_class_requests_stay_out_of_the_interactive_latency_histograms(stack, memory_bus):
    """Queue requests are counted (success, tokens); a batch-class one (the
    queue's default priority) has its own latency histogram, while the TTFT,
    inter-token, queue-time and e2e histograms, and the dashboard's samples,
    keep describing interactive requests (here the priority-0 one)."""
    from fastserve.gateway.app import STATE

    state = stack.runner.app[STATE]
    reg, labels = state.metrics.registry, {"model_name": "tiny"}

    def value(name):
        return reg.get_sample_value(name, labels) or 0.0

    before = {n: value(n) for n in (
        "fastserve:time_to_first_token_seconds_count", "fastserve:e2e_request_latency_seconds_count",
        "fastserve:request_queue_time_seconds_count", "fastserve:batch_request_latency_seconds_count",
        "fastserve:generation_tokens_total")}
    replies = await Replies(memory_bus).start()
    ps = prompts(2, 10, seed=5)
    await replies.send(SubmitRequest("bulk", "/v1/completions", completion(ps[0], max_tokens=6)))
    msg, _ = await replies.next()
    assert msg.request_id == "bulk" and msg.status == 200
    assert value("fastserve:batch_request_latency_seconds_count") == before[
        "fastserve:batch_request_latency_seconds_count"] + 1
    for n in ("fastserve:time_to_first_token_seconds_count", "fastserve:e2e_request_latency_seconds_count",
              "fastserve:request_queue_time_seconds_count"):
        assert value(n) == before[n], n
    assert value("fastserve:generation_tokens_total") == before["fastserve:generation_tokens_total"] + 6

    await replies.send(SubmitRequest("live", "/v1/completions", completion(ps[1], max_tokens=4), priority=0))
    msg, _ = await replies.next()
    assert msg.request_id == "live" and msg.status == 200
    for n in ("fastserve:time_to_first_token_seconds_count", "fastserve:e2e_request_latency_seconds_count"):
        assert value(n) == before[n] + 1, n
    assert value("fastserve:batch_request_latency_seconds_count") == before[
        "fastserve:batch_request_latency_seconds_count"] + 1
    assert value("fastserve:generation_tokens_total") == before["fastserve:generation_tokens_total"] + 10


async def test_a_database_outage_delays_queue_requests_and_loses_or_repeats_none(stack, memory_bus, tiny_model_dir,
                                                                                 monkeypatch):
    """The results database fails (a claim's and a result's transactions each
    raise OperationalError three times): the request waits, unacked, retried
    with backoff; then it runs once and its one result comes back."""
    from sqlalchemy.exc import OperationalError

    from fastserve.gateway.app import STATE

    store = stack.runner.app[STATE].queue.store
    failures = {"claims": 3, "finishes": 3}
    real_claims, real_finishes = store._write_claims, store._write_finishes

    async def flaky(kind, real, conn, items):
        if failures[kind] > 0:
            failures[kind] -= 1
            raise OperationalError("INSERT ...", {}, Exception("database is locked"))
        return await real(conn, items)

    monkeypatch.setattr(store, "_write_claims", lambda conn, items: flaky("claims", real_claims, conn, items))
    monkeypatch.setattr(store, "_write_finishes", lambda conn, items: flaky("finishes", real_finishes, conn, items))
    replies = await Replies(memory_bus).start()
    ps = prompts(1, 10, seed=11)
    expected = offline_greedy(tiny_model_dir, ps, 5)
    finished = stack.scheduler.core.stats.finished
    await replies.send(SubmitRequest("outage", "/v1/completions", completion(ps[0], max_tokens=5)))
    msg, _ = await replies.next(timeout=60)
    assert msg.request_id == "outage" and msg.status == 200 and msg.token_ids == [expected[0]]
    assert failures == {"claims": 0, "finishes": 0}  # every failure was met, and retried past
    assert stack.scheduler.core.stats.finished == finished + 1  # ran once
    with pytest.raises(asyncio.TimeoutError):
        await replies.next(timeout=1.0)  # and answered once


async def test_chat_token_events_errors_and_deadlines(stack, memory_bus):
    replies = await Replies(memory_bus).start()
    await replies.send(SubmitRequest("chat", "/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0,
        "ignore_eos": True}, tokens=True))
    events, result = [], None
    while result is None:
        msg, _ = await replies.next()
        if isinstance(msg, RequestTokens):
            events.append(msg)
        else:
            result = msg
    assert result.status == 200 and len(result.token_ids[0]) == 6
    assert [t for e in events for t in e.token_ids] == result.token_ids[0]
    assert "".join(e.text for e in events) == result.response["choices"][0]["message"]["content"]
    # A request the REST endpoint would refuse: the same 400, as a result.
    await replies.send(SubmitRequest("bad-model", "/v1/completions", {"model": "nope", "prompt": "x"}))
    msg, _ = await replies.next()
    assert msg.status == 404 and msg.error["code"] == "model_not_found"
    await replies.send(SubmitRequest("streamy", "/v1/completions", {**completion("x"), "stream": True}))
    msg, _ = await replies.next()
    assert msg.status == 400 and msg.error["param"] == "stream"
    # Its deadline (timestamp + expiration) passed before a gateway took it: 504, nothing runs.
    await replies.send(SubmitRequest("late", "/v1/completions", completion("x")), timestamp=time.time() - 10,
                       expiration=5)
    msg, _ = await replies.next()
    assert msg.request_id == "late" and msg.status == 504 and msg.response is None


async def test_malformed_messages_go_to_the_dead_letter_queue_with_a_reason(stack, memory_bus):
    replies = await Replies(memory_bus).start()
    dead = asyncio.Queue()

    async def on_dead(d):
        await dead.put(d)

    await memory_bus.consume_deliveries(names.DEAD_LETTER_QUEUE, on_dead)
    await memory_bus.publish(names.SUBMIT_QUEUE, b"\xc1 not msgpack", props=Properties(reply_to=memory_bus.full_name(replies.name)))
    await memory_bus.publish(names.SUBMIT_QUEUE, orjson.dumps({"_t": "SubmitRequest", "_v": 1, "request_id": "x1",
                                                               "url": "/v1/embeddings", "body": {}}),
                             props=Properties(content_type=JSON, reply_to=memory_bus.full_name(replies.name)))
    await memory_bus.publish(names.SUBMIT_QUEUE, encode(SubmitRequest("x2", "/v1/completions", completion("x"))))
    reasons = []
    for _ in range(3):
        d = await asyncio.wait_for(dead.get(), 30)
        reasons.append(d.headers["x-fastserve-reason"])
    assert "not msgpack" in reasons[0]
    assert "url must be one of" in reasons[1]
    assert "no reply_to" in reasons[2]
    # The sender whose id and reply queue could be read hears why.
    msg, props = await replies.next()
    assert msg.request_id == "x1" and msg.status == 400 and "url must be one of" in msg.error["message"]
    assert props.content_type == JSON
    # The consumer goes on.
    await replies.send(SubmitRequest("ok", "/v1/completions", completion("x", max_tokens=2)))
    msg, _ = await replies.next()
    assert msg.request_id == "ok" and msg.status == 200


# ------------------------------------------------------------------ RabbitMQ, with failures

async def test_200_requests_through_the_client_survive_a_scheduler_a_worker_and_a_gateway_restart(
        rabbitmq_url, bus_namespace, tiny_model_dir, tmp_path):
    """Each service on its own connection (as processes would be). After 50
    results the scheduler dies and a new one starts; after 100 the worker;
    after 150 the gateway stops and another takes over. The gateway continues
    the dead scheduler's jobs, the scheduler recomputes the dead worker's, the
    new gateway takes over the old one's requests (redelivered): exactly 200
    results, each once, each the greedy output."""
    from fastserve.client import Client
    from fastserve.common.bus_rabbit import RabbitBus
    from fastserve.gpu_worker.service import WorkerService
    from fastserve.scheduler.service.service import SchedulerService

    cfg = node(tiny_model_dir, tmp_path, heartbeat_interval=0.2, worker_timeout=1.0, health_timeout=1.5)
    buses, stacks, services = [], [], []

    async def bus(name):
        b = RabbitBus(rabbitmq_url, namespace=bus_namespace, connection_name=f"pytest-{name}")
        await b.connect()
        buses.append(b)
        return b

    ps = prompts(200, 12, seed=7)
    expected = offline_greedy(tiny_model_dir, ps, 10)
    try:
        for part in ("worker", "scheduler", "gateway"):
            stacks.append(await Stack(cfg, await bus(part), services=(part,), serve_http=False).start())
        worker, scheduler = stacks[0].worker, stacks[1].scheduler
        async with Client(rabbitmq_url, namespace=bus_namespace, reply_queue=f"{bus_namespace}.results") as client:
            await client.submit_many((f"job-{i}", "/v1/completions", completion(p, 10)) for i, p in enumerate(ps))
            results = {}
            async for r in client.results():
                assert r.request_id not in results
                results[r.request_id] = r
                if len(results) == 50:
                    await scheduler.stop()
                    scheduler = SchedulerService(cfg.scheduler_config(), await bus("scheduler2"))
                    services.append(scheduler)
                    await scheduler.start()
                elif len(results) == 100:
                    await worker.stop()
                    worker = WorkerService(cfg.worker_config(), await bus("worker2"))
                    services.append(worker)
                    await worker.start()
                elif len(results) == 150:  # its unfinished requests go back to the queue, to the next gateway
                    await stacks[2].stop()
                    stacks[2] = await Stack(cfg, await bus("gateway2"), services=("gateway",),
                                            serve_http=False).start()
            await asyncio.sleep(2.0)  # a late duplicate would arrive now
            queue = await client._channel.declare_queue(f"{bus_namespace}.results", durable=True, passive=True)
            assert queue.declaration_result.message_count == 0
            assert client.duplicates == 0
            await client.delete_reply_queue()
        assert sorted(results) == sorted(f"job-{i}" for i in range(200))
        bad = [i for i in range(200) if results[f"job-{i}"].token_ids != [expected[i]]]
        assert not bad, [(i, results[f"job-{i}"].status, results[f"job-{i}"].error) for i in bad[:3]]
        assert scheduler.core.stats.finished > 0  # the new scheduler ran jobs of the old one
    finally:
        for s in services:
            await s.stop()
        for s in reversed(stacks):
            await s.stop()
        for b in buses:
            await b.close()
        cleanup = RabbitBus(rabbitmq_url, namespace=bus_namespace)
        await cleanup.connect()
        for q in (names.SUBMIT_QUEUE, names.BATCH_RESULTS_QUEUE, names.JOB_QUEUE):
            await cleanup.declare_queue(q)
        await cleanup.delete_declared()
        await cleanup.close()


async def test_malformed_messages_on_rabbitmq_are_dead_lettered_with_the_reason(
        rabbitmq_url, bus_namespace, tiny_model_dir, tmp_path):
    from fastserve.common.bus_rabbit import RabbitBus

    b = RabbitBus(rabbitmq_url, namespace=bus_namespace, connection_name="pytest-gw")
    await b.connect()
    s = await Stack(node(tiny_model_dir, tmp_path), b, serve_http=False).start()
    conn = await aio_pika.connect(rabbitmq_url)
    try:
        ch = await conn.channel()
        submit = f"{bus_namespace}.{names.SUBMIT_QUEUE}"
        await ch.default_exchange.publish(aio_pika.Message(b"{oops", content_type=JSON), routing_key=submit)
        await ch.default_exchange.publish(aio_pika.Message(orjson.dumps(
            {"_t": "SubmitRequest", "_v": 1, "request_id": "r", "url": "/v1/completions", "body": {}, "priority": 7}),
            content_type=JSON), routing_key=submit)
        dlq = await ch.declare_queue(f"{bus_namespace}.{names.DEAD_LETTER_QUEUE}", durable=True, passive=True)
        got = []
        for _ in range(300):
            msg = await dlq.get(no_ack=True, fail=False)
            if msg is not None:
                got.append(msg)
            if len(got) == 2:
                break
            await asyncio.sleep(0.05)
        assert [m.body[:5] for m in got] == [b"{oops", b'{"_t"']
        assert "not JSON" in got[0].headers["x-fastserve-reason"]
        assert "priority must be one of" in got[1].headers["x-fastserve-reason"]
        assert got[1].content_type == JSON
    finally:
        await conn.close()
        await s.stop()
        await b.delete_declared()
        await b.close()


async def test_the_documented_client_example_runs(rabbit_bus, rabbitmq_url, bus_namespace, tiny_model_dir, tmp_path):
    """docs/examples/queue_client.py against a stack on RabbitMQ: every request answered, twice the same."""
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "docs" / "examples" / "queue_client.py"
    s = await Stack(node(tiny_model_dir, tmp_path), rabbit_bus, serve_http=False).start()
    cmd = [sys.executable, str(example), "--broker", rabbitmq_url, "--namespace", bus_namespace, "--model", "tiny",
           "--reply-queue", f"{bus_namespace}.example", "--n", "5"]
    try:
        runs = [await asyncio.to_thread(subprocess.run, cmd, capture_output=True, timeout=120) for _ in range(2)]
    finally:
        await s.stop()
        await rabbit_bus.declare_queue(names.SUBMIT_QUEUE)
        await rabbit_bus.declare_queue(names.BATCH_RESULTS_QUEUE)
    for run in runs:
        assert run.returncode == 0, run.stderr.decode()[-2000:]
    lines = [sorted(run.stdout.decode().splitlines()) for run in runs]
    assert len(lines[0]) == 5 and all("\t200\tlength\t12\t" in line for line in lines[0])
    assert lines[0] == lines[1]  # the second run: the stored results of the same ids
