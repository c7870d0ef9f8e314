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


async def _stream_chat(client, template, reply):
    ids = (await (await client.post("/tokenize", json={"prompt": reply, "add_special_tokens": False})).json())
    body = {"model": "tiny", "chat_template": template, "tools": TOOLS, "stream": True,
            "max_tokens": ids["count"], "messages": [{"role": "user", "content": reply}]}
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 200, await resp.text()
    return [json.loads(line[6:])["choices"][0] for line in (await resp.text()).splitlines()
            if line.startswith("data: {")]


@pytest.mark.parametrize("template", [TEMPLATE, "{#- <|python_tag|> tools -#}{{ messages[-1]['content'] }}"],
                         ids=["hermes", "llama3_json"])
async def test_auto_tool_choice_streams_content_as_it_comes(memory_bus, tiny_model_dir, template):
    """With tools offered and tool_choice "auto", a plain answer streams token by
    token (as on vLLM), not all at once at the end."""
    reply = "The weather in Paris is sunny, with a light breeze from the west."
    async with gateway(memory_bus, tiny_model_dir, echo=EchoScheduler(memory_bus)) as (client, _):
        choices = await _stream_chat(client, template, reply)
    content = [c["delta"]["content"] for c in choices[1:] if c["delta"].get("content")]
    assert len(content) > 5  # streamed in pieces
    assert "".join(content) == reply
    assert choices[-1]["finish_reason"] == "length" and "tool_calls" not in choices[-1]["delta"]
    assert all(c["finish_reason"] is None for c in choices[:-1])


async def test_hermes_content_before_a_call_streams_and_the_call_comes_whole(memory_bus, tiny_model_dir):
    before = "Let me look that up for you.\n"
    async with gateway(memory_bus, tiny_model_dir, echo=EchoScheduler(memory_bus)) as (client, _):
        choices = await _stream_chat(client, TEMPLATE, before + CALL)
    content = [c["delta"]["content"] for c in choices[1:] if c["delta"].get("content")]
    assert len(content) > 2 and "".join(content) == before  # not a character of the call leaks as content
    last = choices[-1]
    assert last["finish_reason"] == "tool_calls"
    (call,) = last["delta"]["tool_calls"]
    assert call["index"] == 0 and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}


def test_content_gate_holds_back_what_may_start_a_call():
    from fastserve.gateway.tools import ContentGate

    g = ContentGate("hermes")
    assert g.advance("Hi <tool") == "Hi "  # "<tool" may begin "<tool_call>"
    assert g.advance("Hi <tool_call>{") == ""
    assert g.rest('Hi <tool_call>{"name": "f", "arguments": {}}</tool_call>', has_calls=True) == ""
    g = ContentGate("hermes")
    assert g.advance("a <b") == "a <b"  # cannot begin the marker
    assert g.advance("a <b <t") == " "
    assert g.advance("a <b <tx> c") == "<tx> c"  # not the marker after all
    g = ContentGate("hermes")
    g.advance("x <tool_call>{broken")
    assert g.rest("x <tool_call>{broken", has_calls=False) == "<tool_call>{broken"  # unparsable: content
    g = ContentGate("llama3_json")
    assert g.advance("  ") == "" and g.advance("  {\"na") == ""
    assert g.rest('  {"name": "f", "parameters": {}}', has_calls=True) == ""
    g = ContentGate("llama3_json")
    assert g.advance("<|py") == "" and g.advance("<|pa") == "<|pa"
