"""The official `openai` client against the gateway, on the in-memory bus and on RabbitMQ."""
import pytest
from openai import APIStatusError, AsyncOpenAI, NotFoundError
from tokenizers import Tokenizer

from gateway_fakes import EchoScheduler, gateway

pytestmark = pytest.mark.timeout(60)


def _client(test_client, key="sk-test"):
    return AsyncOpenAI(base_url=str(test_client.make_url("/v1")), api_key=key, max_retries=0)


def _expected(model_dir, prompt, n):
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = tok.encode(prompt).ids
    return tok.decode([ids[i % len(ids)] for i in range(n)])


async def _exercise(bus, model_dir):
    async with gateway(bus, model_dir, echo=EchoScheduler(bus), api_key="sk-test") as (tc, _):
        oai = _client(tc)
        models = await oai.models.list()
        assert [m.id for m in models.data] == ["tiny"]

        prompt = "The official client talks to fastserve"
        c = await oai.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0)
        assert c.choices[0].text == _expected(model_dir, prompt, 6)
        assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 6

        stream = await oai.completions.create(model="tiny", prompt=prompt, max_tokens=6, stream=True,
                                              stream_options={"include_usage": True})
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
            if chunk.usage:
                usage = chunk.usage
        assert text == _expected(model_dir, prompt, 6) and usage.completion_tokens == 6

        chat = await oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                                 max_tokens=5, n=2)
        assert len(chat.choices) == 2 and chat.choices[0].message.role == "assistant"
        assert chat.choices[0].message.content == chat.choices[1].message.content != ""
        assert chat.usage.completion_tokens == 10

        pieces, finish = [], None
        async for chunk in await oai.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=5, stream=True):
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        assert "".join(pieces) == chat.choices[0].message.content and finish == "length"

        with pytest.raises(NotFoundError):
            await oai.completions.create(model="other", prompt="x", max_tokens=1)
        with pytest.raises(APIStatusError) as err:
            await oai.completions.create(model="tiny", prompt="x", max_tokens=10_000)
        assert err.value.status_code == 400 and "maximum context length" in err.value.message
        async with _client(tc, key="wrong") as wrong:
            with pytest.raises(APIStatusError) as err:
                await wrong.completions.create(model="tiny", prompt="x", max_tokens=1)
        assert err.value.status_code == 401
        await oai.close()


async def test_openai_client_on_memory_bus(memory_bus, tiny_model_dir):
    await _exercise(memory_bus, tiny_model_dir)


@pytest.mark.rabbitmq
async def test_openai_client_on_rabbitmq(rabbit_bus, tiny_model_dir):
    await _exercise(rabbit_bus, tiny_model_dir)
