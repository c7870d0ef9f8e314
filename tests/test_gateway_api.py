"""The gateway on the in-memory bus, driven by aiohttp's test client, with a
fake echo scheduler (tests/gateway_fakes.py) as its backend."""
import asyncio
import json

import pytest
from tokenizers import Tokenizer

from gateway_fakes import EchoScheduler, gateway

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))


def echo_ids(tok, prompt, max_tokens):
    ids = tok.encode(prompt).ids
    return [ids[i % len(ids)] for i in range(max_tokens)]


async def sse(resp):
    """The `data:` payloads of an SSE response, [DONE] included."""
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    out = []
    async for line in resp.content:
        line = line.decode().strip()
        if line:
            assert line.startswith("data: "), line
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


async def test_models_health_metrics(memory_bus, tiny_model_dir):
    async with gateway(memory_bus, tiny_model_dir, echo=EchoScheduler(memory_bus)) as (client, _):
        models = await (await client.get("/v1/models")).json()
        assert models["data"][0]["id"] == "tiny" and models["data"][0]["max_model_len"] == 512
        health = await client.get("/health")
        assert health.status == 200, await health.text()
        assert (await health.json())["scheduler"] == ["echo"]
        await client.post("/v1/completions", json={"model": "tiny", "prompt": "hello world", "max_tokens": 3})
        text = await (await client.get("/metrics")).text()
        assert 'fastserve:time_to_first_token_seconds_count{model_name="tiny"} 1.0' in text
        assert 'fastserve:generation_tokens_total{model_name="tiny"} 3.0' in text
        assert 'fastserve:num_requests_running{model_name="tiny",scheduler="echo"}' in text
        assert "fastserve:mlfq_queue_jobs" in text


async def test_health_is_503_without_backend(memory_bus, tiny_model_dir):
    async with gateway(memory_bus, tiny_model_dir) as (client, _):
        resp = await client.get("/health")
        assert resp.status == 503
        assert (await resp.json())["status"] == "unavailable"


async def test_completion_non_streaming(memory_bus, tiny_model_dir, tok):
    prompt = "The quick brown fox jumps over the lazy dog"
    async with gateway(memory_bus, tiny_model_dir, echo=EchoScheduler(memory_bus)) as (client, echo):
        resp = await client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 7,
                                                          "temperature": 0, "seed": 3})
        body = await resp.json()
        assert resp.status == 200, body
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    assert choice["text"] == tok.decode(echo_ids(tok, prompt, 7))
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    n_prompt = len(tok.encode(prompt).ids)
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 7, "total_tokens": n_prompt + 7}
    (job,) = echo.submitted
    assert job.prompt_token_ids == tok.encode(prompt).ids
    assert job.sampling.max_tokens == 7 and job.sampling.temperature == 0 and job.sampling.seed == 3
    assert job.reply_to.startswith("fastserve.reply.gw-")


async def test_completion_streaming_matches_non_streaming(memory_bus, tiny_model_dir, tok):
    prompt = "streaming tokens one by one"
    async with gateway(memory_bus, tiny_model_dir, echo=EchoScheduler(memory_bus)) as (client, _):
        resp = await client.post("/v1/completions", json={
            "model": "tiny", "prompt": prompt, "max_tokens": 9, "stream": True,
            "stream_options": {"include_usage": True}})
        events = await sse(resp)
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 9
    chunks = events[:-2]
    assert all(c["usage"] is None for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == tok.decode(echo_ids(tok, prompt, 9))
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert len(chunks) > 1


async def test_chat_streaming_and_not(memory_bus, tiny_model_dir, tok):
    from fastserve.common.tokenizer import apply_chat_template

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    ids = tok.encode(apply_chat_template(tiny_model_dir, messages), add_special_tokens=False).ids
    expected = tok.decode([ids[i % len(ids)] for i in range(6)])
    async with gateway(memory_bus, tiny_model_dir, echo=EchoScheduler(memory_bus)) as (client, echo):
        body = await (await client.post("/v1/chat/completions", json={
            "model": "tiny", "messages": messages, "max_completion_tokens": 6})).json()
        events = await sse(await client.post("/v1/chat/completions", json={
            "model": "tiny", "messages": messages, "max_tokens": 6, "stream": True}))
    assert echo.submitted[0].prompt_token_ids == ids
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected}
    assert body["usage"]["prompt_tokens"] == len(ids)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[0]["object"] == "chat.completion.chunk"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:-1]) == expected
    assert events[-2]["choices"][0]["finish_reason"] == "length" and events[-1] == "[DONE]"


async def test_chat_default_max_tokens_fills_the_context(memory_bus, tiny_model_dir):
    async with gateway(memory_bus, tiny_model_dir, echo=EchoScheduler(memory_bus, tokens_per_event=64)) as (client, echo):
        body = await (await client.post("/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "x"}]})).json()
    job = echo.submitted[0]
    assert job.sampling.max_tokens == 512 - len(job.prompt_token_ids)
    assert body["usage"]["completion_tokens"] == job.sampling.max_tokens


@pytest.mark.parametrize("stream", [False, True])
async def test_stop_string_across_token_boundary_cancels_job(memory_bus, tiny_model_dir, tok, stream):
    prompt = "alpha beta gamma delta epsilon zeta eta theta"
    ids = tok.encode(prompt).ids
    full = tok.decode(ids)
    # A stop string that starts inside one token and ends inside a later one.
    pieces = [tok.decode(ids[:i]) for i in range(len(ids) + 1)]
    b = next(i for i in range(2, len(ids)) if len(pieces[i]) - len(pieces[i - 1]) >= 2)
    stop = pieces[b][-1] + full[len(pieces[b]):len(pieces[b]) + 2]
    assert full.find(stop) == len(pieces[b]) - 1, (full, stop)
    expected = full[:full.find(stop)]
    async with gateway(memory_bus, tiny_model_dir, echo=EchoScheduler(memory_bus, token_delay=0.01)) as (client, echo):
        req = {"model": "tiny", "prompt": prompt, "max_tokens": 40, "stop": ["never-there", stop], "stream": stream}
        resp = await client.post("/v1/completions", json=req)
        if stream:
            events = await sse(resp)
            text = "".join(e["choices"][0]["text"] for e in events[:-1])
            finish = events[-2]["choices"][0]["finish_reason"]
        else:
            body = await resp.json()
            text, finish = body["choices"][0]["text"], body["choices"][0]["finish_reason"]
        await asyncio.wait_for(echo.cancel_event.wait(), 5)
    assert text == expected and finish == "stop"
    assert echo.cancelled == [echo.submitted[0].job_id]


async def test_stop_token_ids_and_include_stop_str(memory_bus, tiny_model_dir, tok):
    prompt = "one two three four"
    ids = tok.encode(prompt).ids
    async with gateway(memory_bus, tiny_model_dir, echo=EchoScheduler(memory_bus)) as (client, _):
        body = await (await client.post("/v1/completions", json={
            "model": "tiny", "prompt": prompt, "max_tokens": 30, "stop_token_ids": [ids[2]]})).json()
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["usage"]["completion_tokens"] == 3
        word = "three"
        body = await (await client.post("/v1/completions", json={
            "model": "tiny", "prompt": prompt, "max_tokens": 30, "stop": word,
            "include_stop_str_in_output": True})).json()
    assert body["choices"][0]["text"] == tok.decode(ids)[: tok.decode(ids).find(word) + len(word)]


async def test_n_choices_and_multiple_prompts(memory_bus, tiny_model_dir, tok):
    async with gateway(memory_bus, tiny_model_dir, echo=EchoScheduler(memory_bus)) as (client, echo):
        body = await (await client.post("/v1/completions", json={
            "model": "tiny", "prompt": ["first prompt", "second one here"], "n": 2, "max_tokens": 4,
            "seed": 10})).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["choices"][0]["text"] == body["choices"][1]["text"] == tok.decode(echo_ids(tok, "first prompt", 4))
    assert body["choices"][2]["text"] == tok.decode(echo_ids(tok, "second one here", 4))
    assert body["usage"]["completion_tokens"] == 16
    p = len(tok.encode("first prompt").ids) + len(tok.encode("second one here").ids)
    assert body["usage"]["prompt_tokens"] == p
    assert sorted(j.sampling.seed for j in echo.submitted) == [10, 10, 11, 11]
    assert len({j.job_id for j in echo.submitted}) == 4


async def test_logprobs_completion_and_chat(memory_bus, tiny_model_dir, tok):
    async with gateway(memory_bus, tiny_model_dir, echo=EchoScheduler(memory_bus)) as (client, echo):
        body = await (await client.post("/v1/completions", json={
            "model": "tiny", "prompt": "log probs", "max_tokens": 3, "logprobs": 2})).json()
        lp = body["choices"][0]["logprobs"]
        assert lp["token_logprobs"] == [-0.5] * 3 and len(lp["tokens"]) == 3
        assert all(len(t) == 2 for t in lp["top_logprobs"]) and lp["text_offset"][0] == 0
        assert "".join(lp["tokens"]) == body["choices"][0]["text"]
        chat = await (await client.post("/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
            "logprobs": True, "top_logprobs": 1})).json()
        content = chat["choices"][0]["logprobs"]["content"]
        assert len(content) == 2 and content[0]["logprob"] == -0.5 and len(content[0]["top_logprobs"]) == 1
        assert content[0]["bytes"] == list(content[0]["token"].encode())
        assert echo.submitted[0].sampling.logprobs == 2 and echo.submitted[1].sampling.logprobs == 1


async def test_multibyte_text_never_splits_a_character(memory_bus, tiny_model_dir, tok):
    prompt = "naïve café — 你好世界 🙂🚀 ok"
    ids = tok.encode(prompt).ids
    assert any("\ufffd" in tok.decode([i]) for i in ids), "the test needs tokens that split a character"
    async with gateway(memory_bus, tiny_model_dir, echo=EchoScheduler(memory_bus)) as (client, _):
        events = await sse(await client.post("/v1/completions", json={
            "model": "tiny", "prompt": prompt, "max_tokens": len(ids), "stream": True}))
    texts = [e["choices"][0]["text"] for e in events[:-1]]
    assert all("\ufffd" not in t for t in texts)
    assert "".join(texts) == tok.decode(ids)


async def test_tokenize_detokenize(memory_bus, tiny_model_dir, tok):
    async with gateway(memory_bus, tiny_model_dir) as (client, _):
        t = await (await client.post("/tokenize", json={"model": "tiny", "prompt": "hello there"})).json()
        assert t["tokens"] == tok.encode("hello there").ids and t["count"] == len(t["tokens"])
        d = await (await client.post("/detokenize", json={"tokens": t["tokens"]})).json()
        assert d["prompt"] == tok.decode(t["tokens"])
        c = await (await client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})).json()
        assert c["count"] > 2
        bad = await client.post("/detokenize", json={"tokens": [10 ** 9]})
        assert bad.status == 400


async def test_backend_error_becomes_500(memory_bus, tiny_model_dir):
    async with gateway(memory_bus, tiny_model_dir, echo=EchoScheduler(memory_bus, error="worker died")) as (client, _):
        resp = await client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        body = await resp.json()
        assert resp.status == 500 and "worker died" in body["error"]["message"]
        events = await sse(await client.post("/v1/completions", json={
            "model": "tiny", "prompt": "x", "max_tokens": 2, "stream": True}))
        assert "worker died" in events[0]["error"]["message"] and events[-1] == "[DONE]"


async def test_malformed_reply_is_dead_lettered_and_gateway_keeps_serving(memory_bus, tiny_model_dir):
    from fastserve.common import names

    async with gateway(memory_bus, tiny_model_dir, echo=EchoScheduler(memory_bus)) as (client, _):
        app_state = client.server.app
        from fastserve.gateway.app import STATE

        reply_q = app_state[STATE].tracker.reply_queue
        await memory_bus.publish(reply_q, b"\x93garbage")
        await asyncio.sleep(0.05)
        assert memory_bus.queue_size(names.DEAD_LETTER_QUEUE) == 1
        resp = await client.post("/v1/completions", json={"model": "tiny", "prompt": "still up", "max_tokens": 2})
        assert resp.status == 200


async def test_gateway_sends_heartbeats(memory_bus, tiny_model_dir):
    from fastserve.common import names
    from fastserve.common.schemas import Heartbeat, decode

    got = asyncio.Queue()
    await memory_bus.declare_queue("watch", exclusive=True, auto_delete=True,
                                   bindings=[(names.EVENTS_EXCHANGE, "heartbeat.gateway.#")])
    await memory_bus.consume("watch", lambda body, headers: got.put(decode(body, Heartbeat)))
    async with gateway(memory_bus, tiny_model_dir, instance_id="gw-test") as (client, _):
        hb = await asyncio.wait_for(got.get(), 5)
    assert hb.service == "gateway" and hb.instance_id == "gw-test" and hb.info["model"] == "tiny"


async def test_vllm_params_reach_the_backend(memory_bus, tiny_model_dir, tok):
    async with gateway(memory_bus, tiny_model_dir, echo=EchoScheduler(memory_bus)) as (client, echo):
        ids = tok.encode("one two three four five six").ids
        resp = await client.post("/v1/completions", json={
            "model": "tiny", "prompt": ids, "max_tokens": 3, "truncate_prompt_tokens": 4, "min_tokens": 2,
            "presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.2, "min_p": 0.1,
            "logit_bias": {"7": 150, "9": -3}, "allowed_token_ids": [7, 9, 11], "bad_words": ["two"],
            "seed": -2, "top_k": 0})
        assert resp.status == 200, await resp.text()
        chat = await client.post("/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure"}],
            "chat_template": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}",
            "continue_final_message": True, "max_tokens": 1})
        assert chat.status == 200, await chat.text()
    job, chat_job = echo.submitted
    assert job.prompt_token_ids == ids[-4:]
    s = job.sampling
    assert (s.min_tokens, s.presence_penalty, s.frequency_penalty, s.repetition_penalty, s.min_p) == (
        2, 0.5, -0.5, 1.2, 0.1)
    assert s.logit_bias == ((7, 100.0), (9, -3.0))  # clamped to [-100, 100] like vLLM
    assert s.allowed_token_ids == (7, 9, 11) and s.seed == 2**64 - 2 and s.top_k == -1
    assert (tuple(tok.encode("two").ids), tuple(tok.encode(" two").ids)) == s.bad_words
    assert tok.decode(chat_job.prompt_token_ids) == "<user>hi</user><assistant>Sure"


async def test_chat_logprob_bytes_are_the_tokens_own(memory_bus, tiny_model_dir, tok):
    """A token holding part of a UTF-8 character: its bytes, not U+FFFD's."""
    from fastserve.common.tokenizer import apply_chat_template

    messages = [{"role": "user", "content": "東京"}]
    ids = tok.encode(apply_chat_template(tiny_model_dir, messages), add_special_tokens=False).ids
    async with gateway(memory_bus, tiny_model_dir, echo=EchoScheduler(memory_bus)) as (client, _):
        body = await (await client.post("/v1/chat/completions", json={
            "model": "tiny", "messages": messages, "max_tokens": len(ids), "logprobs": True,
            "skip_special_tokens": False})).json()
    content = body["choices"][0]["logprobs"]["content"]
    raw = b"".join(bytes(c["bytes"]) for c in content)
    assert raw.decode() == tok.decode(ids, skip_special_tokens=False)
    partial = [c for c in content if c["token"] == "\ufffd" or "\ufffd" in c["token"]]
    assert partial and all(bytes(c["bytes"]) != "\ufffd".encode() for c in partial)


async def test_priority_1_is_the_batch_class_and_stays_out_of_the_latency_histograms(memory_bus, tiny_model_dir):
    from fastserve.gateway.app import STATE

    async with gateway(memory_bus, tiny_model_dir, echo=EchoScheduler(memory_bus)) as (client, echo):
        reg = client.server.app[STATE].metrics.registry

        def ttft_count():
            return reg.get_sample_value("fastserve:time_to_first_token_seconds_count", {"model_name": "tiny"}) or 0

        for priority, stream in ((1, False), (1, True), (0, False)):
            before = ttft_count()
            resp = await client.post("/v1/completions", json={
                "model": "tiny", "prompt": "hello there", "max_tokens": 2, "priority": priority, "stream": stream})
            assert resp.status == 200, await resp.text()
            await resp.read()
            assert ttft_count() == before + (priority == 0)
        batch = reg.get_sample_value("fastserve:batch_request_latency_seconds_count", {"model_name": "tiny"})
    assert [j.priority for j in echo.submitted] == [1, 1, 0]
    assert batch == 2
