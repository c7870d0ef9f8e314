"""Tool calling: which models can, what a request asks for, and how tool
calls are read out of the generated text.

A model can call tools when its chat template renders `tools` and marks the
calls in a way one of the parsers reads (vLLM's names):
- `hermes` (Qwen2.5, Hermes, many others): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`;
- `llama3_json` (Llama 3.1+): the whole reply is `{"name": ..., "parameters": {...}}`, maybe
  after `<|python_tag|>`, several separated by `;`.
Other models answer 400 for tool_choice "auto", "required" or a named tool.

tool_choice "auto" lets the model decide and parses its text; "required"
and a named function force the output with a grammar (a JSON array of calls,
or the function's arguments), as vLLM does."""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from fastserve.gateway.errors import bad

_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
HERMES_START = "<tool_call>"


def tool_parser_for(template_source: str | None) -> str | None:
    if not template_source or "tools" not in template_source:
        return None
    if HERMES_START in template_source:
        return "hermes"
    if "<|python_tag|>" in template_source or "ipython" in template_source:
        return "llama3_json"
    return None


@dataclass
class ToolRequest:
    tools: list[dict]
    choice: str  # "none" | "auto" | "required" | "named"
    name: str | None = None  # the named function
    parser: str | None = None
    parallel: bool = True

    def forced_schema(self) -> dict | None:
        """The JSON schema the output must match, for "required" and a named function."""
        if self.choice == "named":
            return self._parameters(self.name)
        if self.choice == "required":
            calls = {"type": "array", "minItems": 1, "items": {"anyOf": [{
                "type": "object", "required": ["name", "parameters"], "additionalProperties": False,
                "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                               "parameters": self._parameters(t["function"]["name"])}} for t in self.tools]}}
            if not self.parallel:
                calls["maxItems"] = 1
            return calls
        return None

    def _parameters(self, name: str) -> dict:
        fn = next(t["function"] for t in self.tools if t["function"]["name"] == name)
        return fn.get("parameters") or {"type": "object", "properties": {}}


def parse_tools(body: dict, parser: str | None) -> ToolRequest | None:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none"):
            raise bad("When using `tool_choice`, `tools` must be set.", "tool_choice")
        return None
    if not isinstance(tools, list) or not tools:
        raise bad("'tools' must be a non-empty list of {'type': 'function', 'function': {...}}", "tools")
    names = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}",
                      "tools")
        if not isinstance(fn.get("parameters", {}), dict):
            raise bad(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
        names.append(fn["name"])
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise bad("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    if choice is None:
        choice = "auto"
    req = ToolRequest(tools, "", parser=parser, parallel=parallel)
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type", "function") != "function" or not isinstance(name, str):
            raise bad('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                      '{"name": ...}}', "tool_choice")
        if name not in names:
            raise bad(f"The tool specified in `tool_choice` ({name!r}) does not match any of the specified `tools`",
                      "tool_choice")
        req.choice, req.name = "named", name
    elif choice in ("none", "auto", "required"):
        req.choice = choice
    else:
        raise bad(f'Invalid value for `tool_choice`: {choice!r}; "none", "auto", "required" or a named '
                  "function", "tool_choice")
    if req.choice == "auto" and parser is None:
        raise bad("this model's chat template does not support tool calling (no Hermes <tool_call> or Llama 3 "
                  'JSON tool format): tool_choice "auto" cannot be served; use "none" or a named function',
                  "tool_choice")
    return req


def tool_call(name: str, arguments: Any) -> dict:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"chatcmpl-tool-{uuid.uuid4().hex}", "type": "function",
            "function": {"name": name, "arguments": args}}


def extract_tool_calls(parser: str, text: str) -> tuple[str | None, list[dict]]:
    """(content, tool calls) of a finished reply; text that does not parse
    as tool calls stays content, as vLLM's parsers do."""
    if parser == "hermes":
        start = text.find(HERMES_START)
        if start < 0:
            return text, []
        try:
            calls = [json.loads(m.group(1)) for m in _HERMES_CALL.finditer(text, start)]
            out = [tool_call(c["name"], c.get("arguments", {})) for c in calls]
        except (ValueError, KeyError, TypeError):
            return text, []
        return text[:start].strip() or None, out
    body = text.strip()
    if body.startswith("<|python_tag|>"):
        body = body[len("<|python_tag|>"):].strip()
    if not body.startswith("{"):
        return text, []
    try:
        calls = [json.loads(part) for part in _split_json_objects(body)]
        out = [tool_call(c["name"], c["parameters"] if "parameters" in c else c["arguments"]) for c in calls]
    except (ValueError, KeyError, TypeError):
        return text, []
    return None, out


class ContentGate:
    """Streaming with tool_choice "auto": how much of a reply may go out as
    content before the reply ends. Hermes: everything before `<tool_call>`
    (holding back a tail that may be its beginning); Llama 3 JSON: a reply is
    either all calls (it starts with `{` or `<|python_tag|>`) or all content,
    so nothing goes out until its first characters say which. As vLLM's tool
    parsers stream content; the calls themselves come whole with the last chunk."""

    _LLAMA_MARKERS = ("{", "<|python_tag|>")

    def __init__(self, parser: str | None) -> None:
        self.parser = parser
        self.sent = 0  # characters of the reply already sent as content
        self.calls_started = False

    def _safe(self, text: str) -> int:
        if self.parser == "hermes":
            at = text.find(HERMES_START)
            if at >= 0:
                self.calls_started = True
                return at
            for k in range(min(len(HERMES_START) - 1, len(text)), 0, -1):
                if HERMES_START.startswith(text[-k:]):
                    return len(text) - k  # may be the start of the marker: held back
            return len(text)
        body = text.lstrip()
        if not body or any(m.startswith(body[:len(m)]) for m in self._LLAMA_MARKERS):
            self.calls_started = bool(body)
            return 0  # undecided, or calls: nothing streams
        return len(text)

    def advance(self, text: str) -> str:
        """The content that may go out now, given the reply so far."""
        if self.calls_started and self.parser == "hermes":
            return ""
        safe = self._safe(text)
        if safe <= self.sent:
            return ""
        out, self.sent = text[self.sent:safe], safe
        return out

    def rest(self, text: str, has_calls: bool) -> str:
        """At the end: the content still to send. A reply with calls: the text
        before the first call not sent yet (Hermes; Llama 3 JSON calls have no
        content); one without (or whose calls did not parse): all of its text."""
        if not has_calls:
            return text[self.sent:]
        at = text.find(HERMES_START) if self.parser == "hermes" else -1
        return text[self.sent:at] if at > self.sent else ""


def calls_from_required(text: str) -> list[dict]:
    """The grammar-forced JSON array of a "required" tool choice."""
    return [tool_call(c["name"], c["parameters"]) for c in json.loads(text)]


def _split_json_objects(text: str) -> list[str]:
    decoder, parts, i = json.JSONDecoder(), [], 0
    while i < len(text):
        _, end = decoder.raw_decode(text, i)
        parts.append(text[i:end])
        i = end
        while i < len(text) and text[i] in " \n\t;":
            i += 1
    return parts
