"""Bad requests of every kind get OpenAI-shaped errors with the right status;
disconnecting clients cancel their jobs; admission control answers 429/503."""
import asyncio

import aiohttp
import pytest

from gateway_fakes import EchoScheduler, gateway

pytestmark = pytest.mark.timeout(60)


def assert_openai_error(body, status_param=None):
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if status_param is not None:
        assert body["error"]["param"] == status_param


@pytest.mark.parametrize(
    "path, payload, status, param, words",
    [
        ("/v1/completions", b"{not json", 400, None, "Invalid JSON"),
        ("/v1/completions", b"[1, 2]", 400, None, "must be an object"),
        ("/v1/completions", {"prompt": "x"}, 400, "model", "'model' is required"),
        ("/v1/completions", {"model": "gpt-9", "prompt": "x"}, 404, "model", "does not exist"),
        ("/v1/completions", {"model": "tiny"}, 400, "prompt", "'prompt' must be"),
        ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, "prompt", "empty"),
        ("/v1/completions", {"model": "tiny", "prompt": [5, 10 ** 7]}, 400, "prompt", "outside the vocabulary"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": "3"}, 400, "max_tokens", "must be int"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens", ">= 1"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 600}, 400, "prompt",
         "maximum context length is 512 tokens. However, you requested"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": 3}, 400, "temperature", "[0, 2]"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": True}, 400, "temperature", "number"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p", "(0, 1]"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "top_k": -5}, 400, "top_k", "top_k"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 0}, 400, "n", "'n' must be in"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 99}, 400, "n", "'n' must be in"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": ["ok", ""]}, 400, "stop", "non-empty"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "stop_token_ids": ["a"]}, 400, "stop_token_ids", "token ids"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": 50}, 400, "logprobs", "0..20"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "stream_options": {"include_usage": True}}, 400,
         "stream_options", "only allowed"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "foo": 1}, 400, "foo",
         "Unrecognized request argument supplied: foo"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "presence_penalty": 3}, 400, "presence_penalty", "[-2, 2]"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty", "> 0"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "min_p": 2}, 400, "min_p", "[0, 1]"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "min_tokens": 9, "max_tokens": 3}, 400, "min_tokens",
         "max_tokens=3"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "best_of": 2, "n": 3}, 400, "best_of", "n..16"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "best_of": 2, "stream": True}, 400, "best_of",
         "cannot be streamed"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "suffix": "tail"}, 400, "suffix", "not supported"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "use_beam_search": True}, 400, "use_beam_search",
         "beam search"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "priority": 2}, 400, "priority", "the batch class"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "priority": -1}, 400, "priority", "0 (interactive)"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "truncate_prompt_tokens": 0}, 400,
         "truncate_prompt_tokens", "-1 or in 1..512"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "seed": 2 ** 64}, 400, "seed", "64-bit integer"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias", "token ids"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "logit_bias": {"5000": 1}}, 400, "logit_bias",
         "outside the vocabulary"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "allowed_token_ids": []}, 400, "allowed_token_ids",
         "must not be empty"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "bad_words": [""]}, 400, "bad_words", "non-empty"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "prompt_logprobs": 1, "stream": True}, 400,
         "prompt_logprobs", "streaming"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "stream": True, "stream_options": {"bar": 1}}, 400,
         "stream_options", "include_usage"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "guided_regex": "(unclosed"}, 400, "guided_regex",
         "invalid guided_regex"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "guided_choice": []}, 400, "guided_choice", "non-empty"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "guided_json": {"type": "object"},
                             "guided_regex": "a+"}, 400, "guided_regex", "only one kind"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}}, 400, "response_format",
         "invalid response_format"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "guided_decoding_backend": "xgrammar"}, 400,
         "guided_decoding_backend", "not available"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "tools": []}, 400, "tools", "Unrecognized"),
        ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages", "non-empty list"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400,
         "messages", "'role'"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400,
         "messages", "content"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x" * 3000}]}, 400,
         "messages", "input tokens in the messages, which leaves no room for a completion"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                  "top_logprobs": 2}, 400, "top_logprobs", "needs 'logprobs'"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                  "tools": [{"type": "function"}]}, 400, "tools", "tools[0] must be"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                  "tool_choice": "auto"}, 400, "tool_choice", "`tools` must be set"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                  "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tool_choice",
         "does not support tool calling"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                  "tools": [{"type": "function", "function": {"name": "f"}}],
                                  "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "tool_choice",
         "does not match"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                  "chat_template": 5}, 400, "chat_template", "Jinja"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "assistant", "content": "x"}],
                                  "continue_final_message": True, "add_generation_prompt": True}, 400,
         "continue_final_message", "Cannot set both"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                  "functions": [{"name": "f"}]}, 400, "functions", "Unrecognized"),
        ("/v1/nope", {}, 404, None, "Not Found"),
    ],
)
async def test_bad_requests(memory_bus, tiny_model_dir, path, payload, status, param, words):
    async with gateway(memory_bus, tiny_model_dir, echo=EchoScheduler(memory_bus)) as (client, echo):
        kw = {"data": payload} if isinstance(payload, bytes) else {"json": payload}
        resp = await client.post(path, **kw)
        body = await resp.json()
        assert resp.status == status, body
        assert_openai_error(body, param)
        assert words in body["error"]["message"]
        assert echo.submitted == []  # nothing reached the backend
        metrics = await (await client.get("/metrics")).text()
        assert f'fastserve:request_errors_total{{model_name="tiny",status="{status}"}} 1.0' in metrics


async def test_context_error_names_the_numbers(memory_bus, tiny_model_dir):
    async with gateway(memory_bus, tiny_model_dir, echo=EchoScheduler(memory_bus)) as (client, _):
        ids = (await (await client.post("/tokenize", json={"prompt": "hello there"})).json())["tokens"]
        body = await (await client.post("/v1/completions", json={
            "model": "tiny", "prompt": ids, "max_tokens": 512})).json()
    msg = body["error"]["message"]
    assert f"requested {len(ids) + 512} tokens ({len(ids)} in the prompt, 512 for the completion)" in msg
    assert body["error"]["code"] == "context_length_exceeded"


async def test_api_keys(memory_bus, tiny_model_dir):
    async with gateway(memory_bus, tiny_model_dir, echo=EchoScheduler(memory_bus), api_key="k1,k2") as (client, _):
        req = {"model": "tiny", "prompt": "x", "max_tokens": 1}
        missing = await client.post("/v1/completions", json=req)
        assert missing.status == 401 and (await missing.json())["error"]["code"] == "invalid_api_key"
        wrong = await client.post("/v1/completions", json=req, headers={"Authorization": "Bearer nope"})
        assert wrong.status == 401 and "Incorrect API key" in (await wrong.json())["error"]["message"]
        assert (await client.get("/v1/models")).status == 401
        ok = await client.post("/v1/completions", json=req, headers={"Authorization": "Bearer k2"})
        assert ok.status == 200
        assert (await client.get("/health")).status == 200  # probes need no key
        assert (await client.get("/metrics")).status == 200


async def test_gateway_limit_answers_429(memory_bus, tiny_model_dir):
    echo = EchoScheduler(memory_bus, token_delay=0.05)
    async with gateway(memory_bus, tiny_model_dir, echo=echo, max_pending_requests=1) as (client, _):
        slow = asyncio.ensure_future(client.post("/v1/completions", json={
            "model": "tiny", "prompt": "slow one", "max_tokens": 10}))
        while not echo.submitted:
            await asyncio.sleep(0.01)
        resp = await client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1})
        body = await resp.json()
        assert resp.status == 429 and "Too many requests" in body["error"]["message"]
        assert (await slow).status == 200
        assert (await client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1})).status == 200


async def test_full_scheduler_queue_answers_503(memory_bus, tiny_model_dir):
    echo = EchoScheduler(memory_bus, max_queued_jobs=4, num_waiting=4)
    async with gateway(memory_bus, tiny_model_dir, echo=echo) as (client, _):
        resp = await client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1})
        body = await resp.json()
    assert resp.status == 503 and body["error"]["code"] == "queue_full" and "4 jobs waiting" in body["error"]["message"]


async def test_no_scheduler_answers_503_after_grace(memory_bus, tiny_model_dir):
    async with gateway(memory_bus, tiny_model_dir, health_timeout=0.2) as (client, _):
        await asyncio.sleep(0.3)
        resp = await client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1})
        body = await resp.json()
    assert resp.status == 503 and "No scheduler is alive" in body["error"]["message"]


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_cancels_the_job(memory_bus, tiny_model_dir, stream):
    echo = EchoScheduler(memory_bus, token_delay=0.05)
    async with gateway(memory_bus, tiny_model_dir, echo=echo) as (client, _):
        url = client.make_url("/v1/completions")
        req = {"model": "tiny", "prompt": "a long story", "max_tokens": 200, "stream": stream}
        async with aiohttp.ClientSession() as session:
            if stream:
                resp = await session.post(url, json=req)
                first = await resp.content.readline()
                assert first.startswith(b"data: ")
                resp.close()  # drop the connection mid-stream
            else:
                with pytest.raises(asyncio.TimeoutError):
                    await session.post(url, json=req, timeout=aiohttp.ClientTimeout(total=0.3))
        await asyncio.wait_for(echo.cancel_event.wait(), 5)
        assert echo.cancelled == [echo.submitted[0].job_id]
        # The gateway forgot the request: the pending count is back to zero.
        health = await (await client.get("/health")).json()
        for _ in range(50):
            if health["pending_requests"] == 0:
                break
            await asyncio.sleep(0.02)
            health = await (await client.get("/health")).json()
        assert health["pending_requests"] == 0


async def test_unexpected_failure_is_an_openai_shaped_500(memory_bus, tiny_model_dir):
    from fastserve.gateway.app import STATE

    async with gateway(memory_bus, tiny_model_dir, echo=EchoScheduler(memory_bus)) as (client, echo):
        async def broken_submit(*args, **kwargs):
            raise RuntimeError("broker exploded")

        client.server.app[STATE].tracker.submit = broken_submit
        resp = await client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1})
        body = await resp.json()
    assert resp.status == 500
    assert_openai_error(body)
    assert "broker exploded" in body["error"]["message"] and body["error"]["type"] == "server_error"


async def test_one_bad_request_never_touches_another(memory_bus, tiny_model_dir):
    """top_k beyond the vocabulary is refused with a 400 naming it; a prompt
    far beyond the context is refused before it is tokenized; meanwhile a
    stream and /health go on undisturbed."""
    echo = EchoScheduler(memory_bus, token_delay=0.02)
    async with gateway(memory_bus, tiny_model_dir, echo=echo) as (client, _):
        stream = asyncio.ensure_future(client.post("/v1/completions", json={
            "model": "tiny", "prompt": "steady", "max_tokens": 40, "stream": True}))
        resp = await client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "top_k": 2**63})
        body = await resp.json()
        assert resp.status == 400 and body["error"]["param"] == "top_k"
        huge = "lorem ipsum " * 500_000  # 6 MB of text
        t0 = asyncio.get_running_loop().time()
        health = asyncio.ensure_future(client.get("/health"))
        resp = await client.post("/v1/completions", json={"model": "tiny", "prompt": huge, "max_tokens": 4})
        body = await resp.json()
        assert resp.status == 400 and body["error"]["code"] == "context_length_exceeded"
        assert (await health).status == 200
        assert asyncio.get_running_loop().time() - t0 < 5
        r = await stream
        text = (await r.read()).decode()
        assert r.status == 200 and text.rstrip().endswith("data: [DONE]") and "error" not in text


async def test_a_broker_that_refuses_the_job_is_a_503_not_a_500(memory_bus, tiny_model_dir):
    from fastserve.common import names

    async with gateway(memory_bus, tiny_model_dir, echo=EchoScheduler(memory_bus)) as (client, _):
        publish = memory_bus.publish

        async def failing(key, body, headers=None, *, exchange="", persistent=False):
            if key == names.JOB_QUEUE:
                raise ConnectionError("broker gone")
            return await publish(key, body, headers, exchange=exchange, persistent=persistent)

        memory_bus.publish = failing
        resp = await client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1})
        body = await resp.json()
        memory_bus.publish = publish
        assert resp.status == 503 and body["error"]["code"] == "service_unavailable"
        health = await (await client.get("/health")).json()
        assert health["pending_requests"] == 0  # nothing left behind
