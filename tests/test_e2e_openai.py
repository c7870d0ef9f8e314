"""End to end through HTTP: the official `openai` client against the whole
stack (`fastserve up` in-process: gateway, scheduler, worker, KV store) on the
in-memory bus and on RabbitMQ; greedy outputs equal `fastserve generate`."""
from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
import uuid

import aiohttp
import pytest

from fastserve.launcher import NodeConfig, Stack


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_healthy(base_url: str, timeout: float = 30.0) -> None:
    async with aiohttp.ClientSession() as http:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{base_url}/health") as r:
                    if r.status == 200:
                        return
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{base_url}/health never became 200")
            await asyncio.sleep(0.1)


def fastserve_generate(model_dir, prompt: str, max_tokens: int, chat: bool = False) -> dict:
    """What `fastserve generate --json` prints for one greedy prompt."""
    from fastserve.cli import main

    out = io.StringIO()
    argv = ["generate", "--model", str(model_dir), "--prompt", prompt, "--max-tokens", str(max_tokens),
            "--temperature", "0", "--json"] + (["--chat"] if chat else [])
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return json.loads(out.getvalue().strip().splitlines()[-1])


@pytest.fixture
async def served(bus, tiny_model_dir, tmp_path):
    cfg = NodeConfig(model=str(tiny_model_dir), replica=f"r{uuid.uuid4().hex[:6]}", port=free_port(),
                     gpu_kv_blocks=64, host_kv_blocks=64, host_kv_dir=str(tmp_path))
    stack = await Stack(cfg, bus).start()
    await wait_healthy(stack.base_url)
    yield stack
    await stack.stop()


async def test_openai_client_greedy_equals_fastserve_generate(served, tiny_model_dir):
    import openai

    client = openai.AsyncOpenAI(base_url=f"{served.base_url}/v1", api_key="unused")
    model = (await client.models.list()).data[0].id
    prompt = "the quick brown fox"
    want = fastserve_generate(tiny_model_dir, prompt, 12)

    r = await client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == want["text"]
    assert r.usage.prompt_tokens == len(want["prompt_token_ids"])
    assert r.usage.completion_tokens == len(want["token_ids"])
    assert r.choices[0].finish_reason == want["finish_reason"]

    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True)
    text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert text == want["text"]

    msgs = [{"role": "user", "content": prompt}]
    want_chat = fastserve_generate(tiny_model_dir, prompt, 10, chat=True)
    r = await client.chat.completions.create(model=model, messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == want_chat["text"]
    stream = await client.chat.completions.create(model=model, messages=msgs, max_tokens=10, temperature=0,
                                                  stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want_chat["text"]
    assert chunks[-1].usage.completion_tokens == len(want_chat["token_ids"])
    await client.close()


async def test_client_disconnect_cancels_the_job_and_frees_kv(served):
    body = {"model": "x", "prompt": "once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{served.base_url}/v1/models") as r:
            body["model"] = (await r.json())["data"][0]["id"]
        async with http.post(f"{served.base_url}/v1/completions", json=body) as r:
            assert r.status == 200
            got = 0
            async for line in r.content:
                if line.startswith(b"data: {"):
                    got += 1
                if got >= 3:
                    break
            assert served.scheduler.jobs.num_unfinished() == 1
            assert served.scheduler.core.gpu_blocks_used() > 0
        # Leaving the block closes the connection mid-stream.
    for _ in range(300):
        if (not served.scheduler.jobs.num_unfinished() and served.scheduler.core.gpu_blocks_used() == 0
                and not served.worker.seqs):
            break
        await asyncio.sleep(0.02)
    assert served.scheduler.jobs.num_unfinished() == 0
    assert served.scheduler.core.gpu_blocks_used() == 0
    assert not served.worker.seqs  # the worker was told to forget it, though idle
