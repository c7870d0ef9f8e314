"""Chat messages -> prompt text through the model's chat template (or one the
request brings), with vLLM's extras: tools and documents for the template,
chat_template_kwargs, add_generation_prompt and continue_final_message."""
from __future__ import annotations

import json

import jinja2

from fastserve.common.tokenizer import ChatTemplate
from fastserve.gateway.errors import bad
from fastserve.gateway.model_info import ModelInfo

_CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
_MESSAGE_KEYS = {"role", "content", "name", "tool_calls", "tool_call_id"}
# Template variables a request's chat_template_kwargs may not replace.
_RESERVED = {"messages", "add_generation_prompt", "tools", "documents", "bos_token", "eos_token"}


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _CHAT_ROLES:
            raise bad(f"messages[{i}] must be an object with 'role' one of {', '.join(_CHAT_ROLES)}", "messages")
        if set(m) - _MESSAGE_KEYS:
            raise bad(f"messages[{i}] has unsupported fields {sorted(set(m) - _MESSAGE_KEYS)}", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"messages[{i}].content: only text parts are supported", "messages")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string or a list of text parts", "messages")
        msg = {"role": m["role"], "content": content}
        for key in ("name", "tool_call_id"):
            if m.get(key) is not None:
                if not isinstance(m[key], str):
                    raise bad(f"messages[{i}].{key} must be a string", "messages")
                msg[key] = m[key]
        if m.get("tool_calls") is not None:
            msg["tool_calls"] = _tool_calls(m["tool_calls"], i)
        clean.append(msg)
    return clean


def _tool_calls(calls, i: int) -> list[dict]:
    """Templates expect each call's arguments as a mapping (as transformers passes them)."""
    if not isinstance(calls, list):
        raise bad(f"messages[{i}].tool_calls must be a list", "messages")
    out = []
    for c in calls:
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad(f"messages[{i}].tool_calls entries need function.name and function.arguments", "messages")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args else {}
            except ValueError:
                raise bad(f"messages[{i}].tool_calls: arguments are not JSON", "messages") from None
        out.append({"id": c.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def render_chat(body: dict, model: ModelInfo, tools: list[dict] | None = None) -> str:
    messages = _messages(body)
    template = model.chat_template
    if body.get("chat_template") is not None:
        if not isinstance(body["chat_template"], str) or not body["chat_template"]:
            raise bad("'chat_template' must be a non-empty string (a Jinja template)", "chat_template")
        try:
            template = ChatTemplate(body["chat_template"], model.bos_token, model.eos_token)
        except jinja2.TemplateError as exc:
            raise bad(f"'chat_template' does not compile: {exc}", "chat_template") from None
    if template is None:
        raise bad("this model has no chat template (tokenizer_config.json chat_template); send 'chat_template' or "
                  "use /v1/completions", "messages")
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict) or _RESERVED & set(kwargs):
        raise bad(f"'chat_template_kwargs' must be an object without {sorted(_RESERVED)}", "chat_template_kwargs")
    documents = body.get("documents")
    if documents is not None and (not isinstance(documents, list) or not all(isinstance(d, dict) for d in documents)):
        raise bad("'documents' must be a list of objects", "documents")
    cont = body.get("continue_final_message", False)
    add = body.get("add_generation_prompt")
    if not isinstance(cont, bool) or (add is not None and not isinstance(add, bool)):
        raise bad("'continue_final_message' and 'add_generation_prompt' must be booleans", "continue_final_message")
    if cont and add:
        raise bad("Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                  "continue_final_message")
    add = (not cont) if add is None else add
    extra = {**kwargs, **({"tools": tools} if tools else {}), **({"documents": documents} if documents else {})}
    try:
        text = template.apply_chat_template(messages, add_generation_prompt=add, **extra)
    except (ValueError, TypeError, jinja2.TemplateError) as exc:
        raise bad(f"the chat template refused these messages: {exc}", "messages") from None
    return _continue_final(text, messages[-1]["content"]) if cont else text


def _continue_final(text: str, final: str) -> str:
    """Cut the rendered chat right after the final message's content, so the
    model continues it (transformers' continue_final_message)."""
    stripped = final.strip()
    if not stripped or stripped not in text:
        raise bad("continue_final_message is set but the final message does not appear in the rendered chat",
                  "continue_final_message")
    at = text.rindex(stripped)
    if text[at:at + len(final.lstrip())] == final.lstrip():
        return text[:at + len(final.lstrip())]
    return text[:at + len(stripped)]


def echo_prefix(body: dict) -> str:
    """vLLM's chat `echo`: the reply starts with the last message's content
    when that message is the assistant's (the one being continued)."""
    last = body["messages"][-1]
    if last.get("role") != "assistant":
        return ""
    content = last.get("content") or ""
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content
