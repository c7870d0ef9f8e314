"""OpenAI request validation: JSON body -> GenerateRequest, or APIError with
OpenAI's error shape {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jinja2

from fastserve.common.sampling_params import SamplingParams

from fastserve.gateway.config import GatewayConfig
from fastserve.gateway.model_info import ModelInfo

_CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
_MAX_STOP = 16


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


@dataclass
class GenerateRequest:
    kind: str  # "completion" | "chat"
    prompts: list[list[int]]  # token ids, one list per prompt
    n: int
    sampling: SamplingParams  # the seed of choice j of a prompt is seed + j
    stop: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False  # return logprobs at all
    top_logprobs: int = 0  # alternatives per token
    skip_special_tokens: bool = True

    def choice_sampling(self, j: int) -> SamplingParams:
        """n > 1 with a seed: distinct but reproducible choices."""
        if self.sampling.seed is None or j == 0:
            return self.sampling
        return SamplingParams(**{**self.sampling.__dict__, "seed": self.sampling.seed + j})


# ------------------------------------------------------------------ field readers

_MISSING = object()


def _get(body: dict, key: str, kinds: tuple[type, ...], default: Any = None, *, what: str = "") -> Any:
    value = body.get(key, _MISSING)
    if value is _MISSING or value is None:
        return default
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        names = what or " or ".join(k.__name__ for k in kinds).replace("float", "number").replace("str", "string")
        raise bad(f"'{key}' must be {names}, got {type(value).__name__} {value!r:.50}", key)
    return value


def _int_list(value: Any, key: str, vocab: int) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise bad(f"'{key}' must be a list of token ids", key)
    for t in value:
        if not 0 <= t < vocab:
            raise bad(f"'{key}' contains token id {t}, outside the vocabulary [0, {vocab})", key)
    return value


def check_model(body: dict, model: ModelInfo) -> None:
    name = body.get("model")
    if name is None:
        raise bad("'model' is required", "model")
    if name != model.name:
        raise APIError(404, f"The model '{name}' does not exist; this server serves '{model.name}'.",
                       "invalid_request_error", "model", "model_not_found")


def _reject_unsupported(body: dict) -> None:
    if body.get("echo"):
        raise bad("'echo' is not supported", "echo")
    if body.get("suffix"):
        raise bad("'suffix' is not supported", "suffix")
    if body.get("logit_bias"):
        raise bad("'logit_bias' is not supported", "logit_bias")
    for key in ("presence_penalty", "frequency_penalty"):
        v = _get(body, key, (int, float), 0.0)
        if v != 0:
            raise bad(f"'{key}' is not supported (only 0)", key)
    if _get(body, "repetition_penalty", (int, float), 1.0) != 1.0:
        raise bad("'repetition_penalty' is not supported (only 1)", "repetition_penalty")
    if body.get("tools") or body.get("functions"):
        raise bad("tool and function calling are not supported", "tools")
    rf = body.get("response_format")
    if rf is not None and (not isinstance(rf, dict) or rf.get("type", "text") != "text"):
        raise bad("only response_format {'type': 'text'} is supported", "response_format")


def _common(body: dict, cfg: GatewayConfig, model: ModelInfo, kind: str, prompts: list[list[int]],
            default_max_tokens: int | None, logprobs: bool, top_logprobs: int) -> GenerateRequest:
    _reject_unsupported(body)
    n = _get(body, "n", (int,), 1)
    if not 1 <= n <= cfg.max_n:
        raise bad(f"'n' must be in 1..{cfg.max_n}, got {n}", "n")
    best_of = _get(body, "best_of", (int,), n)
    if best_of != n:
        raise bad("'best_of' different from 'n' is not supported", "best_of")
    max_tokens = _get(body, "max_completion_tokens", (int,), None)
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", (int,), None)
    if max_tokens is not None and max_tokens < 1:
        raise bad(f"'max_tokens' must be >= 1, got {max_tokens}", "max_tokens")
    longest = max(len(p) for p in prompts)
    if max_tokens is None:
        max_tokens = default_max_tokens if default_max_tokens is not None else model.max_model_len - longest
    param = "messages" if kind == "chat" else "prompt"
    if longest + max_tokens > model.max_model_len or max_tokens < 1:
        raise bad(f"This model's maximum context length is {model.max_model_len} tokens. However, you requested "
                  f"{longest + max_tokens} tokens ({longest} in the {param}, {max_tokens} for the completion). "
                  "Please reduce the length of the prompt or the completion.", param, "context_length_exceeded")
    temperature = _get(body, "temperature", (int, float), 1.0)
    if not 0.0 <= temperature <= 2.0:
        raise bad(f"'temperature' must be in [0, 2], got {temperature}", "temperature")
    top_p = _get(body, "top_p", (int, float), 1.0)
    if not 0.0 < top_p <= 1.0:
        raise bad(f"'top_p' must be in (0, 1], got {top_p}", "top_p")
    top_k = _get(body, "top_k", (int,), -1)
    if top_k == 0:
        top_k = -1  # vLLM: 0 also means off
    if top_k < -1:
        raise bad(f"'top_k' must be -1 (off) or >= 1, got {top_k}", "top_k")
    if top_k > model.vocab_size:
        raise bad(f"'top_k' must be at most the vocabulary size ({model.vocab_size}), got {top_k}", "top_k")
    seed = _get(body, "seed", (int,), None)
    stop = body.get("stop")
    stop_list = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stop_list, list) or not all(isinstance(s, str) and s for s in stop_list):
        raise bad("'stop' must be a non-empty string or a list of non-empty strings", "stop")
    if len(stop_list) > _MAX_STOP:
        raise bad(f"'stop' may hold at most {_MAX_STOP} strings", "stop")
    stop_ids = _int_list(body.get("stop_token_ids") or [], "stop_token_ids", model.vocab_size)
    stream = _get(body, "stream", (bool,), False)
    stream_options = _get(body, "stream_options", (dict,), None)
    if stream_options is not None and not stream:
        raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
    include_usage = bool((stream_options or {}).get("include_usage", False))
    try:
        sampling = SamplingParams(
            temperature=float(temperature), top_p=float(top_p), top_k=top_k, seed=seed, max_tokens=max_tokens,
            stop_token_ids=tuple(stop_ids), ignore_eos=_get(body, "ignore_eos", (bool,), False),
            logprobs=top_logprobs if logprobs else None,
        )
    except ValueError as exc:
        raise bad(str(exc)) from None
    return GenerateRequest(
        kind=kind, prompts=prompts, n=n, sampling=sampling, stop=stop_list,
        include_stop_str_in_output=_get(body, "include_stop_str_in_output", (bool,), False),
        stream=stream, include_usage=include_usage, logprobs=logprobs, top_logprobs=top_logprobs,
        skip_special_tokens=_get(body, "skip_special_tokens", (bool,), True),
    )


def parse_completion(body: dict, cfg: GatewayConfig, model: ModelInfo) -> GenerateRequest:
    check_model(body, model)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        raw: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raw = [prompt]
    elif isinstance(prompt, list) and prompt:
        raw = prompt
    else:
        raise bad("'prompt' must be a non-empty string, list of strings, list of token ids or list of such lists",
                  "prompt")
    prompts = []
    for p in raw:
        if isinstance(p, str):
            _check_size(p, model, "prompt")
            ids = model.encode(p)
        elif isinstance(p, list):
            ids = _int_list(p, "prompt", model.vocab_size)
        else:
            raise bad("each prompt must be a string or a list of token ids", "prompt")
        if not ids:
            raise bad("the prompt is empty (no tokens)", "prompt")
        prompts.append(ids)
    lp = _get(body, "logprobs", (int,), None)
    if lp is not None and not 0 <= lp <= cfg.max_logprobs:
        raise bad(f"'logprobs' must be in 0..{cfg.max_logprobs}, got {lp}", "logprobs")
    return _common(body, cfg, model, "completion", prompts, 16, lp is not None, lp or 0)


def render_chat(body: dict, model: ModelInfo) -> str:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _CHAT_ROLES:
            raise bad(f"messages[{i}] must be an object with 'role' one of {', '.join(_CHAT_ROLES)}", "messages")
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
        clean.append({"role": m["role"], "content": content})
    if model.chat_template is None:
        raise bad("this model has no chat template (tokenizer_config.json chat_template); use /v1/completions")
    add_generation_prompt = _get(body, "add_generation_prompt", (bool,), True)
    try:
        return model.chat_template.apply_chat_template(clean, add_generation_prompt=add_generation_prompt)
    except (ValueError, jinja2.TemplateError) as exc:
        raise bad(f"the chat template refused these messages: {exc}", "messages") from None


def _check_size(text: str, model: ModelInfo, param: str) -> None:
    if model.too_long(text):
        raise bad(f"This model's maximum context length is {model.max_model_len} tokens; the {param} has "
                  f"{len(text)} characters, more than any {model.max_model_len} tokens can hold.", param,
                  "context_length_exceeded")


def parse_chat(body: dict, cfg: GatewayConfig, model: ModelInfo) -> GenerateRequest:
    check_model(body, model)
    text = render_chat(body, model)
    _check_size(text, model, "messages")
    # The template writes the special tokens itself, so none are added here (as transformers does).
    ids = model.encode(text, add_special_tokens=False)
    if not ids:
        raise bad("the rendered chat prompt is empty", "messages")
    logprobs = _get(body, "logprobs", (bool,), False)
    top = _get(body, "top_logprobs", (int,), 0)
    if not 0 <= top <= cfg.max_logprobs:
        raise bad(f"'top_logprobs' must be in 0..{cfg.max_logprobs}, got {top}", "top_logprobs")
    if top and not logprobs:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return _common(body, cfg, model, "chat", [ids], None, logprobs, top)
