"""vLLM API parity through the whole stack (in-process, memory bus) with the
openai client and raw HTTP: structured output that validates, echo and
prompt logprobs equal to the engine's prefill, best_of, tiny temperatures,
64-bit seeds, the KV pool's real limit, per-request metrics."""
from __future__ import annotations

import json
import re
import uuid

import aiohttp
import jsonschema
import pytest
from openai import AsyncOpenAI

from fastserve.launcher import NodeConfig, Stack

from test_e2e_openai import free_port, wait_healthy

pytestmark = pytest.mark.timeout(180)

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "tags": {
        "type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
     "required": ["ok", "tags"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "point": {
        "type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                         "y": {"type": "integer", "minimum": -9, "maximum": 9}},
        "required": ["x", "y"], "additionalProperties": False}}, "required": ["color", "point"],
     "additionalProperties": False},
]


@pytest.fixture
async def served(memory_bus, tiny_model_dir, tmp_path):
    cfg = NodeConfig(model=str(tiny_model_dir), served_model_name="tiny", replica=f"r{uuid.uuid4().hex[:6]}",
                     port=free_port(),
                     gpu_kv_blocks=64, kv_policy="recompute", host_kv_blocks=0)
    stack = await Stack(cfg, memory_bus).start()
    await wait_healthy(stack.base_url)
    yield stack
    await stack.stop()


def client(stack) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0)


async def post(stack, path: str, body: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{stack.base_url}{path}", json=body) as r:
            return r.status, await r.json()


@pytest.mark.parametrize("schema", SCHEMAS, ids=["person", "tags", "nested"])
async def test_json_schema_output_validates(served, schema):
    """A random-weight model constrained by the schema's grammar writes valid JSON, whatever the seed.
    (Without disable_any_whitespace, vLLM's default, JSON may hold any whitespace between tokens, and a
    random model can spend max_tokens on it.)"""
    c = client(served)
    for seed in range(3):
        r = await c.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "give me json"}], max_tokens=200, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
            extra_body={"structured_outputs": {"disable_any_whitespace": True}})
        text = r.choices[0].message.content
        jsonschema.validate(json.loads(text), schema)
        assert r.choices[0].finish_reason == "stop"


async def test_guided_choice_regex_and_json_object(served):
    status, body = await post(served, "/v1/completions", {"model": "tiny", "prompt": "pick", "max_tokens": 20,
                                                          "guided_choice": ["yes", "no", "maybe"], "seed": 1})
    assert status == 200 and body["choices"][0]["text"] in ("yes", "no", "maybe")
    status, body = await post(served, "/v1/completions", {"model": "tiny", "prompt": "code", "max_tokens": 20,
                                                          "guided_regex": "[A-Z]{3}-[0-9]{2}", "seed": 2})
    assert status == 200 and re.fullmatch("[A-Z]{3}-[0-9]{2}", body["choices"][0]["text"])
    status, body = await post(served, "/v1/completions", {
        "model": "tiny", "prompt": "obj", "max_tokens": 120, "seed": 3,
        "structured_outputs": {"json": {"type": "object", "properties": {"n": {"type": "integer", "maximum": 99}},
                                        "required": ["n"], "additionalProperties": False},
                               "disable_any_whitespace": True}})
    assert status == 200 and json.loads(body["choices"][0]["text"]).keys() == {"n"}
    assert " " not in body["choices"][0]["text"]


async def test_echo_returns_the_prompt_and_its_prefill_logprobs(served, tiny_model_dir):
    from fastserve.gpu_worker.batch import SeqWork
    from fastserve.gpu_worker.engine import Engine

    prompt = "The quick brown fox jumps"
    c = client(served)
    r = await c.completions.create(model="tiny", prompt=prompt, max_tokens=3, echo=True, logprobs=2, temperature=0)
    engine = Engine(tiny_model_dir, num_gpu_blocks=8)
    ids = engine.tokenizer.encode(prompt).ids
    logp = engine.forward([SeqWork("p", ids, 0, [0, 1])], all_logits=True).log_softmax(-1)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(prompt)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:len(ids)] == pytest.approx([float(logp[j, ids[j + 1]]) for j in range(len(ids) - 1)],
                                                          abs=1e-4)
    assert len(lp.tokens) == len(ids) + 3 and "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[len(ids)] == len(prompt)
    # max_tokens 0 with echo: the prompt alone (a scoring request).
    only = await c.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    assert only.choices[0].text == prompt and len(only.choices[0].logprobs.tokens) == len(ids)
    assert only.usage.completion_tokens == 0
    # vLLM's prompt_logprobs field.
    status, body = await post(served, "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 1,
                                                          "prompt_logprobs": 1})
    plp = body["choices"][0]["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids)
    first = plp[1][str(ids[1])]
    assert first["logprob"] == pytest.approx(float(logp[0, ids[1]]), abs=1e-4)
    assert first["rank"] == int((logp[0] > logp[0, ids[1]]).sum()) + 1


async def test_tiny_temperature_is_greedy_and_64_bit_seeds(served):
    c = client(served)
    greedy = await c.completions.create(model="tiny", prompt="Hello", max_tokens=10, temperature=0)
    tiny = await c.completions.create(model="tiny", prompt="Hello", max_tokens=10, temperature=1e-40, seed=4)
    assert tiny.choices[0].text == greedy.choices[0].text
    seeded = await c.completions.create(model="tiny", prompt="Hello", max_tokens=6, n=2, seed=2**64 - 1)
    assert len(seeded.choices) == 2
    again = await c.completions.create(model="tiny", prompt="Hello", max_tokens=6, n=2, seed=2**64 - 1)
    assert [x.text for x in again.choices] == [x.text for x in seeded.choices]
    # choice 1 used seed (2**64 - 1) + 1 mod 2**64 = 0
    zero = await c.completions.create(model="tiny", prompt="Hello", max_tokens=6, seed=0)
    assert zero.choices[0].text == seeded.choices[1].text


async def test_best_of_returns_the_most_likely_choice(served):
    c = client(served)
    best = await c.completions.create(model="tiny", prompt="Once", max_tokens=8, best_of=3, n=1, seed=10)
    totals = {}
    for s in (10, 11, 12):
        r = await c.completions.create(model="tiny", prompt="Once", max_tokens=8, seed=s, logprobs=0)
        totals[r.choices[0].text] = sum(r.choices[0].logprobs.token_logprobs)
    assert best.choices[0].text == max(totals, key=totals.get)
    assert best.choices[0].logprobs is None  # not asked for


async def test_min_tokens_and_continue_final_message(served):
    status, free = await post(served, "/v1/completions", {"model": "tiny", "prompt": "Hello", "max_tokens": 12,
                                                          "temperature": 0, "ignore_eos": True})
    tok = (await post(served, "/tokenize", {"prompt": free["choices"][0]["text"], "add_special_tokens": False}))[1]
    stop_id = tok["tokens"][3]
    status, body = await post(served, "/v1/completions", {"model": "tiny", "prompt": "Hello", "max_tokens": 12,
                                                          "temperature": 0, "stop_token_ids": [stop_id],
                                                          "min_tokens": 10})
    assert status == 200 and body["usage"]["completion_tokens"] >= 10
    status, body = await post(served, "/v1/chat/completions", {
        "model": "tiny", "max_tokens": 2, "continue_final_message": True, "echo": True,
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Well, the"}]})
    assert status == 200 and body["choices"][0]["message"]["content"].startswith("Well, the")


async def test_kv_pool_limit_is_advertised_and_enforced(memory_bus, tiny_model_dir):
    cfg = NodeConfig(model=str(tiny_model_dir), served_model_name="tiny", replica=f"r{uuid.uuid4().hex[:6]}",
                     port=free_port(),
                     gpu_kv_blocks=8, block_size=16, kv_policy="recompute", host_kv_blocks=0)
    stack = await Stack(cfg, memory_bus).start()
    try:
        await wait_healthy(stack.base_url)
        c = client(stack)
        assert (await c.models.retrieve("tiny")).model_extra["max_model_len"] == 128
        status, body = await post(stack, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 200})
        assert status == 400 and "maximum context length is 128 tokens" in body["error"]["message"]
        status, body = await post(stack, "/v1/chat/completions", {"model": "tiny", "messages": [
            {"role": "user", "content": "hi"}]})
        assert status == 200 and body["usage"]["total_tokens"] <= 128
    finally:
        await stack.stop()


async def test_models_retrieve_and_small_endpoints(served):
    c = client(served)
    m = await c.models.retrieve("tiny")
    assert m.id == "tiny" and m.owned_by == "fastserve"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{served.base_url}/v1/models/nope") as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "model_not_found"
        async with http.get(f"{served.base_url}/version") as r:
            assert r.status == 200 and (await r.json())["version"]
        for method in ("GET", "POST"):
            async with http.request(method, f"{served.base_url}/ping") as r:
                assert r.status == 200 and (await r.json())["status"] == "ok"


async def test_metrics_count_requests_not_choices(served):
    c = client(served)
    r = await c.completions.create(model="tiny", prompt="Hello there", max_tokens=3, n=4, seed=1)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{served.base_url}/metrics") as resp:
            text = await resp.text()

    def value(name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and not line.startswith("#"))

    assert value("fastserve:request_success_total") == 1
    assert value("fastserve:prompt_tokens_total") == r.usage.prompt_tokens
    assert value("fastserve:generation_tokens_total") == r.usage.completion_tokens == 12
    assert value("fastserve:time_to_first_token_seconds_count") == 1
    assert value("fastserve:e2e_request_latency_seconds_count") == 1


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}


async def test_named_and_required_tool_choice_force_valid_calls(served):
    c = client(served)
    messages = [{"role": "user", "content": "weather?"}]
    for seed in range(2):
        r = await c.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], seed=seed,
                                            max_tokens=150, tool_choice={"type": "function",
                                                                         "function": {"name": "get_weather"}},
                                            extra_body={"structured_outputs": {"disable_any_whitespace": True}})
        (call,) = r.choices[0].message.tool_calls
        assert call.function.name == "get_weather" and call.id.startswith("chatcmpl-tool-")
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    r = await c.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], seed=5, max_tokens=300,
                                        tool_choice="required", parallel_tool_calls=False,
                                        extra_body={"structured_outputs": {"disable_any_whitespace": True}})
    assert r.choices[0].finish_reason == "tool_calls"
    (call,) = r.choices[0].message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
