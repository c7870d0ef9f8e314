"""OpenAI's Batch API driven by the official `openai` client: upload, a whole
batch (a malformed line fails alone), list, cancel, and a gateway restart in
the middle of a batch: its state is in the database (SQLite, and PostgreSQL
when several gateways share the work), the batch completes, every custom_id
once. PostgreSQL tests need a server at $FASTSERVE_TEST_POSTGRES (default
postgresql://postgres@127.0.0.1:5432/test): skipped with the reason printed
when there is none, failed under CI=true."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import uuid
from urllib.parse import urlparse

import pytest
from openai import AsyncOpenAI

from fastserve.common.testing import skip_unless_ci
from fastserve.launcher import Stack
from test_queue_api import node, served_text
from test_services_stack import offline_greedy, prompts

pytestmark = pytest.mark.timeout(300)
POSTGRES = os.environ.get("FASTSERVE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=["sqlite", "postgresql"])
async def database(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/fastserve.db"
        return
    import asyncpg

    u = urlparse(POSTGRES)
    try:
        socket.create_connection((u.hostname, u.port or 5432), 1.0).close()
    except OSError as exc:
        skip_unless_ci(f"PostgreSQL not reachable at {u.hostname}:{u.port or 5432} ({exc})")
    name = f"fastserve_test_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(POSTGRES)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield u._replace(path=f"/{name}").geturl()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def lines_for(ps, max_tokens, prefix="req"):
    return [json.dumps({"custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/completions", "body": {
        "model": "tiny", "prompt": p, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}})
        for i, p in enumerate(ps)]


async def wait_status(client, batch_id, statuses, timeout=120.0):
    for _ in range(int(timeout / 0.1)):
        b = await client.batches.retrieve(batch_id)
        if b.status in statuses:
            return b
        await asyncio.sleep(0.1)
    raise AssertionError(f"batch {batch_id} stayed {b.status}")


async def read_file(client, file_id) -> list[dict]:
    content = await client.files.content(file_id)
    return [json.loads(line) for line in content.text.splitlines()]


async def test_a_whole_batch_cancel_and_a_gateway_restart(memory_bus, database, tiny_model_dir, tmp_path):
    cfg = node(tiny_model_dir, tmp_path, port=_free_port(), database=database, max_batch_size=8)
    backend = await Stack(cfg, memory_bus, services=("worker", "scheduler")).start()
    gateway = await Stack(cfg, memory_bus, services=("gateway",)).start()
    client = AsyncOpenAI(base_url=f"{gateway.base_url}/v1", api_key="none", max_retries=0)
    try:
        # A whole batch: every line runs, a malformed one fails alone.
        ps = prompts(12, 10, seed=21)
        expected = offline_greedy(tiny_model_dir, ps, 8)
        lines = lines_for(ps, 8)
        lines.insert(3, json.dumps({"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions",
                                    "body": {"model": "tiny"}}))
        f = await client.files.create(file=("in.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch")
        assert f.purpose == "batch" and f.bytes > 0 and (await client.files.retrieve(f.id)).filename == "in.jsonl"
        batch = await client.batches.create(input_file_id=f.id, endpoint="/v1/completions",
                                            completion_window="24h", metadata={"run": "one"})
        assert batch.status in ("validating", "in_progress") and batch.request_counts.total == 13
        done = await wait_status(client, batch.id, {"completed"})
        assert (done.request_counts.completed, done.request_counts.failed) == (12, 1)
        assert done.metadata == {"run": "one"} and done.completed_at >= done.created_at
        out = await read_file(client, done.output_file_id)
        assert sorted(x["custom_id"] for x in out) == sorted(f"req-{i}" for i in range(12))
        for x in out:
            i = int(x["custom_id"][4:])
            assert x["response"]["status_code"] == 200 and x["error"] is None
            assert x["response"]["body"]["choices"][0]["text"] == served_text(tiny_model_dir, ps[i], expected[i])
        errors = await read_file(client, done.error_file_id)
        assert [x["custom_id"] for x in errors] == ["bad"] and "differs from the batch's endpoint" in \
            errors[0]["error"]["message"]

        # Cancel: what ran stays, what did not ends with batch_cancelled.
        many = lines_for(prompts(150, 10, seed=22), 48, prefix="c")
        f2 = await client.files.create(file=("many.jsonl", ("\n".join(many) + "\n").encode()), purpose="batch")
        b2 = await client.batches.create(input_file_id=f2.id, endpoint="/v1/completions", completion_window="24h")
        cancelling = await client.batches.cancel(b2.id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
        cancelled = await wait_status(client, b2.id, {"cancelled"})
        ran = await read_file(client, cancelled.output_file_id) if cancelled.output_file_id else []
        not_run = await read_file(client, cancelled.error_file_id)
        assert cancelled.request_counts.completed == len(ran) < 150
        assert {x["error"]["code"] for x in not_run} == {"batch_cancelled"}
        assert sorted(x["custom_id"] for x in ran + not_run) == sorted(f"c-{i}" for i in range(150))
        with pytest.raises(Exception) as info:
            await client.batches.cancel(done.id)
        assert getattr(info.value, "status_code", None) == 409

        # A gateway restart in the middle of a batch.
        third = lines_for(prompts(60, 10, seed=23), 24, prefix="r")
        f3 = await client.files.create(file=("third.jsonl", ("\n".join(third) + "\n").encode()), purpose="batch")
        b3 = await client.batches.create(input_file_id=f3.id, endpoint="/v1/completions", completion_window="24h")
        for _ in range(600):
            if (await client.batches.retrieve(b3.id)).request_counts.completed >= 5:
                break
            await asyncio.sleep(0.05)
        await gateway.stop()
        await client.close()
        gateway = await Stack(cfg, memory_bus, services=("gateway",)).start()
        client = AsyncOpenAI(base_url=f"{gateway.base_url}/v1", api_key="none", max_retries=0)
        b3 = await wait_status(client, b3.id, {"completed"})
        assert (b3.request_counts.completed, b3.request_counts.failed) == (60, 0)
        out3 = await read_file(client, b3.output_file_id)
        assert sorted(x["custom_id"] for x in out3) == sorted(f"r-{i}" for i in range(60))
        assert (await client.batches.retrieve(batch.id)).status == "completed"  # the earlier ones survived too
        listed = await client.batches.list(limit=2)
        assert [b.id for b in listed.data] == [b3.id, b2.id] and listed.has_more
        assert [b.id async for b in await client.batches.list(limit=2)] == [b3.id, b2.id, batch.id]
    finally:
        await client.close()
        await gateway.stop()
        await backend.stop()
