"""The gateway owns each request until it ends: when the scheduler holding a
job dies, the job is submitted again as a continuation (prompt + the tokens
already streamed) and the client sees a pause, never an error nor a token twice."""
from __future__ import annotations

import asyncio
import json

from gateway_fakes import EchoScheduler, gateway


async def test_a_dead_schedulers_job_continues_elsewhere_without_a_token_twice(memory_bus, tiny_model_dir):
    a = EchoScheduler(memory_bus, name="sched-a", token_delay=0.01, die_after=6)
    async with gateway(memory_bus, tiny_model_dir, echo=a, health_timeout=0.6) as (client, _):
        prompt = list(range(100, 130))
        stream = asyncio.ensure_future(client.post("/v1/completions", json={
            "model": "tiny", "prompt": prompt, "max_tokens": 20, "stream": True, "logprobs": 0}))
        await asyncio.wait_for(a.dead.wait(), 10)
        b = EchoScheduler(memory_bus, name="sched-b", token_delay=0.01)
        await b.start()
        try:
            r = await asyncio.wait_for(stream, 30)
            lines = [line for line in (await r.read()).decode().splitlines() if line.startswith("data: {")]
        finally:
            await b.stop()
    tokens = [t for line in lines for t in (json.loads(line[6:])["choices"][0]["logprobs"] or {}).get("tokens", [])]
    assert len(tokens) == 20
    cont = b.submitted[0]
    assert cont.num_generated == 6 and cont.prompt_token_ids == prompt + prompt[:6]
    assert cont.job_id != a.submitted[0].job_id and cont.sampling == a.submitted[0].sampling
    # Exactly the tokens an undisturbed run gives: the prompt's first 20, each once.
    from fastserve.gateway.model_info import ModelInfo

    info = ModelInfo.load(tiny_model_dir, "tiny")
    assert "".join(tokens) == info.decode(prompt[:20])
