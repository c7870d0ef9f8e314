"""Tool calling in the gateway: which templates can, parsing Hermes and
Llama 3 JSON calls, tool_choice "auto" end to end with the echo backend
(it answers with the prompt, so the prompt is the reply)."""
import json

import pytest

from fastserve.gateway.tools import extract_tool_calls, tool_parser_for

from gateway_fakes import EchoScheduler, gateway

pytestmark = pytest.mark.timeout(60)


def test_parser_follows_the_template():
    assert tool_parser_for("{% for tool in tools %}{% endfor %}<tool_call>") == "hermes"
    assert tool_parser_for("{% if tools %}<|python_tag|>{% endif %}") == "llama3_json"
    assert tool_parser_for("{{ messages }}") is None
    assert tool_parser_for("<tool_call> but never the variable") is None


def test_hermes_and_llama3_calls():
    content, calls = extract_tool_calls(
        "hermes", 'Let me look.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n'
                  '<tool_call>{"name": "g", "arguments": {}}</tool_call>')
    assert content == "Let me look."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [("f", {"a": 1}),
                                                                                               ("g", {})]
    assert extract_tool_calls("hermes", "no calls here") == ("no calls here", [])
    assert extract_tool_calls("hermes", "<tool_call>{not json") == ("<tool_call>{not json", [])
    content, calls = extract_tool_calls("llama3_json", '<|python_tag|>{"name": "f", "parameters": {"x": "y"}}; '
                                                       '{"name": "g", "parameters": {}}')
    assert content is None and [c["function"]["name"] for c in calls] == ["f", "g"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"x": "y"}
    assert extract_tool_calls("llama3_json", "Paris is sunny.") == ("Paris is sunny.", [])


TEMPLATE = "{#- tools are called as <tool_call> -#}{{ messages[-1]['content'] }}"
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize("stream", [False, True])
async def test_auto_tool_choice_parses_the_reply(memory_bus, tiny_model_dir, stream):
    async with gateway(memory_bus, tiny_model_dir, echo=EchoScheduler(memory_bus)) as (client, echo):
        ids = (await (await client.post("/tokenize", json={"prompt": CALL, "add_special_tokens": False})).json())
        body = {"model": "tiny", "chat_template": TEMPLATE, "tools": TOOLS, "stream": stream,
                "max_tokens": ids["count"], "messages": [{"role": "user", "content": CALL}]}
        resp = await client.post("/v1/chat/completions", json=body)
        if stream:
            events = [json.loads(line[6:]) for line in (await resp.text()).splitlines()
                      if line.startswith("data: {")]
            assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
            (last,) = [e for e in events if e["choices"][0]["finish_reason"]]
            message, reason = last["choices"][0]["delta"], last["choices"][0]["finish_reason"]
            assert message["tool_calls"][0]["index"] == 0
        else:
            out = await resp.json()
            message, reason = out["choices"][0]["message"], out["choices"][0]["finish_reason"]
    assert reason == "tool_calls" and message.get("content") is None
    (call,) = message["tool_calls"]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}


async def test_tool_messages_reach_the_template(memory_bus, tiny_model_dir):
    template = ("{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}"
                "{% for c in m.get('tool_calls', []) %}[{{ c['function']['name'] }}({{ c['function']['arguments']['city'] }})]"
                "{% endfor %}|{% endfor %}{% for t in tools %}T={{ t['function']['name'] }}{% endfor %}")
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                {"role": "tool", "tool_call_id": "1", "content": "rain"}]
    async with gateway(memory_bus, tiny_model_dir, echo=EchoScheduler(memory_bus)) as (client, echo):
        resp = await client.post("/v1/chat/completions", json={
            "model": "tiny", "chat_template": template, "messages": messages, "tools": TOOLS, "tool_choice": "none",
            "max_tokens": 1})
        assert resp.status == 200, await resp.text()
        text = (await (await client.post("/detokenize", json={"tokens": echo.submitted[0].prompt_token_ids})).json())
    assert text["prompt"] == "user:weather?|assistant:[get_weather(Oslo)]|tool:rain|T=get_weather"
