"""OpenAI request validation: JSON body -> GenerateRequest, or APIError with
OpenAI's error shape {"error": {"message", "type", "param", "code"}}.

Every parameter a client can send is either honoured with vLLM's semantics
or refused with a 400 that names it: the bodies are checked against the
lists below, and a parameter outside them is an error, never ignored."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from fastserve.common.sampling_params import LOGIT_BIAS_LIMIT, SEED_LIMIT, SamplingParams
from fastserve.common.schemas import PRIORITIES, PRIORITY_BATCH, PRIORITY_INTERACTIVE
from fastserve.gateway.chat import echo_prefix, render_chat
from fastserve.gateway.config import GatewayConfig
from fastserve.gateway.errors import APIError, bad
from fastserve.gateway.model_info import ModelInfo
from fastserve.gateway.structured import GUIDED_KEYS, grammar_for
from fastserve.gateway.tools import ToolRequest, parse_tools, tool_parser_for

__all__ = ["APIError", "GenerateRequest", "bad", "check_model", "parse_chat", "parse_completion"]

_MAX_STOP = 16
_MAX_BAD_WORDS = 128

_COMMON = {
    "model", "n", "best_of", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
    "max_tokens", "min_tokens", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
    "logprobs", "prompt_logprobs", "echo", "ignore_eos", "skip_special_tokens", "include_stop_str_in_output",
    "stream", "stream_options", "user", "response_format", *GUIDED_KEYS, "guided_whitespace_pattern",
    "guided_decoding_backend", "structured_outputs", "allowed_token_ids", "bad_words", "truncate_prompt_tokens",
    "add_special_tokens", "request_id",
    # accepted only at their defaults (below)
    "use_beam_search", "length_penalty", "spaces_between_special_tokens", "priority",
}
_COMPLETION = _COMMON | {"prompt", "suffix"}
_CHAT = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                   "parallel_tool_calls", "chat_template", "chat_template_kwargs", "continue_final_message",
                   "add_generation_prompt", "documents"}
# Parameters this server has no machinery for: fine at these values, a 400 otherwise.
_DEFAULT_ONLY = {
    "use_beam_search": (False, "beam search is not supported"),
    "length_penalty": (1.0, "length_penalty only applies to beam search, which is not supported"),
    "spaces_between_special_tokens": (True, "only true is supported"),
    "suffix": ("", "suffix is not supported"),
}


@dataclass
class GenerateRequest:
    kind: str  # "completion" | "chat"
    prompts: list[list[int]]  # token ids, one list per prompt
    n: int
    sampling: SamplingParams  # the seed of choice j of a prompt is seed + j (mod 2**64)
    stop: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False  # return logprobs at all
    top_logprobs: int = 0  # alternatives per token
    skip_special_tokens: bool = True
    best_of: int = 1  # jobs per prompt; the n with the highest cumulative logprob are returned
    echo: bool = False
    echo_texts: list[str] = field(default_factory=list)  # per prompt: the text echoed before the output
    echo_only: bool = False  # max_tokens 0 with echo: the prompt alone, nothing generated
    prompt_logprobs: int | None = None  # returned in the response (vLLM's field)
    tools: ToolRequest | None = None
    request_id: str | None = None
    user: str | None = None
    # 0: interactive; 1: the batch class, below every level of the policy (as on the submission queue).
    priority: int = PRIORITY_INTERACTIVE

    def choice_sampling(self, j: int) -> SamplingParams:
        """Choice j of a prompt: seed + j (distinct but reproducible); the
        prompt's logprobs are computed by choice 0 only."""
        changes: dict[str, Any] = {}
        if self.sampling.seed is not None and j:
            changes["seed"] = (self.sampling.seed + j) % SEED_LIMIT
        if j and self.sampling.prompt_logprobs is not None:
            changes["prompt_logprobs"] = None
        return replace(self.sampling, **changes) if changes else self.sampling


# ------------------------------------------------------------------ field readers

_MISSING = object()


def as_int(value: Any) -> int | None:
    """An integer, also written as 1.0 (JSON Schema's and vLLM's integers); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _get(body: dict, key: str, kinds: tuple[type, ...], default: Any = None, *, what: str = "") -> Any:
    value = body.get(key, _MISSING)
    if value is _MISSING or value is None:
        return default
    if kinds == (int,) and as_int(value) is not None:
        return as_int(value)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        names = what or " or ".join(k.__name__ for k in kinds).replace("float", "number").replace("str", "string")
        raise bad(f"'{key}' must be {names}, got {type(value).__name__} {value!r:.50}", key)
    return value


def _int_list(value: Any, key: str, vocab: int) -> list[int]:
    if not isinstance(value, list) or any(as_int(t) is None for t in value):
        raise bad(f"'{key}' must be a list of token ids", key)
    value = [as_int(t) for t in value]
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


def _check_keys(body: dict, allowed: set[str]) -> None:
    for key in body:
        if key not in allowed:
            raise bad(f"Unrecognized request argument supplied: {key}", key)
    for key, (default, why) in _DEFAULT_ONLY.items():
        if key in body and body[key] not in (None, default):
            raise bad(f"'{key}' = {body[key]!r:.50} is not supported: {why}", key)


def _seed(body: dict) -> int | None:
    seed = _get(body, "seed", (int,), None)
    if seed is None or seed == -1:  # vLLM: -1 is no seed
        return None
    if not -(2**63) <= seed < SEED_LIMIT:
        raise bad(f"'seed' must be a 64-bit integer, got {seed}", "seed")
    return seed % SEED_LIMIT


def _logit_bias(body: dict, vocab: int) -> tuple[tuple[int, float], ...]:
    raw = _get(body, "logit_bias", (dict,), {})
    out = []
    for key, value in raw.items():
        try:
            tid = int(key)
        except (TypeError, ValueError):
            raise bad(f"'logit_bias' keys must be token ids, got {key!r:.30}", "logit_bias") from None
        if not 0 <= tid < vocab:
            raise bad(f"'logit_bias' names token id {tid}, outside the vocabulary [0, {vocab})", "logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(f"'logit_bias' values must be numbers, got {value!r:.30}", "logit_bias")
        out.append((tid, min(LOGIT_BIAS_LIMIT, max(-LOGIT_BIAS_LIMIT, float(value)))))
    return tuple(out)


def _bad_words(body: dict, model: ModelInfo) -> tuple[tuple[int, ...], ...]:
    """vLLM's tokenization of bad words: the word as written, and with a
    leading space when that is a different token sequence of the same length."""
    words = _get(body, "bad_words", (list,), [])
    if not all(isinstance(w, str) and w for w in words):
        raise bad("'bad_words' must be a list of non-empty strings", "bad_words")
    out: list[tuple[int, ...]] = []
    for word in dict.fromkeys(words):
        plain = tuple(model.encode(word.lstrip(), add_special_tokens=False))
        if not plain:
            raise bad(f"bad word {word!r} is no token at all", "bad_words")
        out.append(plain)
        spaced = tuple(model.encode(" " + word.lstrip(), add_special_tokens=False))
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            out.append(spaced)
    if len(out) > _MAX_BAD_WORDS:
        raise bad(f"too many bad words after tokenization ({len(out)} > {_MAX_BAD_WORDS})", "bad_words")
    return tuple(out)


def _truncate(prompts: list[list[int]], body: dict, max_len: int) -> list[list[int]]:
    k = _get(body, "truncate_prompt_tokens", (int,), None)
    if k is None:
        return prompts
    if k == -1:
        k = max_len
    if not 1 <= k <= max_len:
        raise bad(f"'truncate_prompt_tokens' must be -1 or in 1..{max_len} (the context length), got {k}",
                  "truncate_prompt_tokens")
    return [p[-k:] for p in prompts]  # vLLM keeps the last k tokens


def _common(body: dict, cfg: GatewayConfig, model: ModelInfo, kind: str, prompts: list[list[int]],
            max_len: int, logprobs: bool, top_logprobs: int, *, echo_texts: list[str], grammar: str | None,
            tools: ToolRequest | None = None) -> GenerateRequest:
    param = "messages" if kind == "chat" else "prompt"
    n = _get(body, "n", (int,), 1)
    if not 1 <= n <= cfg.max_n:
        raise bad(f"'n' must be in 1..{cfg.max_n}, got {n}", "n")
    best_of = _get(body, "best_of", (int,), n)
    if not n <= best_of <= cfg.max_n:
        raise bad(f"'best_of' must be in n..{cfg.max_n} (n={n}), got {best_of}", "best_of")
    stream = _get(body, "stream", (bool,), False)
    if best_of > n and stream:
        raise bad("'best_of' > 'n' cannot be streamed: the best choices are known only at the end", "best_of")
    echo = _get(body, "echo", (bool,), False)
    max_tokens = _get(body, "max_completion_tokens", (int,), None)
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", (int,), None)
    echo_only = kind == "completion" and echo and max_tokens == 0
    if max_tokens is not None and max_tokens < 1 and not echo_only:
        raise bad(f"'max_tokens' must be >= 1 (0 only with echo), got {max_tokens}", "max_tokens")
    longest = max(len(p) for p in prompts)
    if longest >= max_len:
        raise bad(f"This model's maximum context length is {max_len} tokens. However, your request has {longest} "
                  f"input tokens in the {param}, which leaves no room for a completion. Please reduce the length "
                  f"of the {param}.", param, "context_length_exceeded")
    if echo_only:
        max_tokens = 1  # one token is generated and dropped: the prefill computes the prompt's logprobs
    elif max_tokens is None:  # vLLM: the rest of the context (completions: at most 16)
        max_tokens = max_len - longest if kind == "chat" else min(16, max_len - longest)
    elif longest + max_tokens > max_len:
        raise bad(f"This model's maximum context length is {max_len} tokens. However, you requested "
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
    stop = body.get("stop")
    stop_list = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stop_list, list) or not all(isinstance(s, str) and s for s in stop_list):
        raise bad("'stop' must be a non-empty string or a list of non-empty strings", "stop")
    if len(stop_list) > _MAX_STOP:
        raise bad(f"'stop' may hold at most {_MAX_STOP} strings", "stop")
    stop_ids = _int_list(body.get("stop_token_ids") or [], "stop_token_ids", model.vocab_size)
    allowed = body.get("allowed_token_ids")
    if allowed is not None:
        allowed = _int_list(allowed, "allowed_token_ids", model.vocab_size)
        if not allowed:
            raise bad("'allowed_token_ids' must not be empty", "allowed_token_ids")
    stream_options = _get(body, "stream_options", (dict,), None)
    if stream_options is not None:
        if not stream:
            raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if set(stream_options) - {"include_usage"}:
            raise bad(f"'stream_options' supports only 'include_usage', got {sorted(stream_options)}",
                      "stream_options")
    include_usage = bool((stream_options or {}).get("include_usage", False))
    prompt_logprobs = _get(body, "prompt_logprobs", (int,), None)
    if prompt_logprobs is not None:
        if not 0 <= prompt_logprobs <= cfg.max_logprobs:
            raise bad(f"'prompt_logprobs' must be in 0..{cfg.max_logprobs}, got {prompt_logprobs}", "prompt_logprobs")
        if stream:
            raise bad("'prompt_logprobs' are not available when streaming", "prompt_logprobs")
    # echo with logprobs (completions) shows the prompt tokens' logprobs too.
    engine_prompt_lps = prompt_logprobs
    if echo and logprobs and kind == "completion" and engine_prompt_lps is None:
        engine_prompt_lps = top_logprobs
    # best_of ranks the choices by cumulative logprob: the chosen tokens' logprobs are needed.
    want_lp = top_logprobs if logprobs else (0 if best_of > n else None)
    try:
        sampling = SamplingParams(
            temperature=float(temperature), top_p=float(top_p), top_k=top_k,
            min_p=float(_get(body, "min_p", (int, float), 0.0)), seed=_seed(body), max_tokens=max_tokens,
            min_tokens=_get(body, "min_tokens", (int,), 0), stop_token_ids=tuple(stop_ids),
            ignore_eos=_get(body, "ignore_eos", (bool,), False), logprobs=want_lp, prompt_logprobs=engine_prompt_lps,
            presence_penalty=float(_get(body, "presence_penalty", (int, float), 0.0)),
            frequency_penalty=float(_get(body, "frequency_penalty", (int, float), 0.0)),
            repetition_penalty=float(_get(body, "repetition_penalty", (int, float), 1.0)),
            logit_bias=_logit_bias(body, model.vocab_size),
            allowed_token_ids=None if allowed is None else tuple(allowed),
            bad_words=_bad_words(body, model), grammar=grammar,
        )
    except ValueError as exc:
        field_name = str(exc).split(" ", 1)[0]
        raise bad(str(exc), field_name if field_name in body else None) from None
    request_id = _get(body, "request_id", (str,), None)
    priority = _get(body, "priority", (int,), PRIORITY_INTERACTIVE)
    if priority not in PRIORITIES:
        raise bad(f"'priority' must be {PRIORITY_INTERACTIVE} (interactive) or {PRIORITY_BATCH} (the batch class: "
                  f"runs on the capacity interactive requests leave), got {priority}", "priority")
    return GenerateRequest(
        kind=kind, prompts=prompts, n=n, sampling=sampling, stop=stop_list,
        include_stop_str_in_output=_get(body, "include_stop_str_in_output", (bool,), False),
        stream=stream, include_usage=include_usage, logprobs=logprobs, top_logprobs=top_logprobs,
        skip_special_tokens=_get(body, "skip_special_tokens", (bool,), True), best_of=best_of,
        echo=echo, echo_texts=echo_texts if echo else [], echo_only=echo_only, prompt_logprobs=prompt_logprobs,
        tools=tools, request_id=request_id, user=_get(body, "user", (str,), None), priority=priority,
    )


def parse_completion(body: dict, cfg: GatewayConfig, model: ModelInfo, max_len: int) -> GenerateRequest:
    """max_len: the longest job (prompt + output) the backend can serve."""
    check_model(body, model)
    _check_keys(body, _COMPLETION)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        raw: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(as_int(t) is not None for t in prompt):
        raw = [prompt]
    elif isinstance(prompt, list) and prompt:
        raw = prompt
    else:
        raise bad("'prompt' must be a non-empty string, list of strings, list of token ids or list of such lists",
                  "prompt")
    add_special = _get(body, "add_special_tokens", (bool,), True)
    prompts, texts = [], []
    for p in raw:
        if isinstance(p, str):
            _check_size(p, model, "prompt")
            ids = model.encode(p, add_special_tokens=add_special)
        elif isinstance(p, list):
            ids = _int_list(p, "prompt", model.vocab_size)
        else:
            raise bad("each prompt must be a string or a list of token ids", "prompt")
        if not ids:
            raise bad("the prompt is empty (no tokens)", "prompt")
        prompts.append(ids)
    prompts = _truncate(prompts, body, max_len)
    for p, ids in zip(raw, prompts):
        texts.append(p if isinstance(p, str) and "truncate_prompt_tokens" not in body else model.decode(ids))
    lp = _get(body, "logprobs", (int,), None)
    if lp is not None and not 0 <= lp <= cfg.max_logprobs:
        raise bad(f"'logprobs' must be in 0..{cfg.max_logprobs}, got {lp}", "logprobs")
    return _common(body, cfg, model, "completion", prompts, max_len, lp is not None, lp or 0,
                   echo_texts=texts, grammar=grammar_for(body))


def _check_size(text: str, model: ModelInfo, param: str) -> None:
    """Refuse, before tokenizing it, a text no context could hold."""
    if model.too_long(text):
        raise bad(f"This model's maximum context length is {model.max_model_len} tokens; the {param} has "
                  f"{len(text)} characters, more than any {model.max_model_len} tokens can hold.", param,
                  "context_length_exceeded")


def parse_chat(body: dict, cfg: GatewayConfig, model: ModelInfo, max_len: int) -> GenerateRequest:
    check_model(body, model)
    _check_keys(body, _CHAT)
    template = body.get("chat_template")
    tools = parse_tools(body, tool_parser_for(template) if isinstance(template, str) else model.tool_parser)
    text = render_chat(body, model, tools.tools if tools else None)
    _check_size(text, model, "messages")
    # The template writes the special tokens itself, so none are added by default (as transformers does).
    ids = model.encode(text, add_special_tokens=_get(body, "add_special_tokens", (bool,), False))
    if not ids:
        raise bad("the rendered chat prompt is empty", "messages")
    logprobs = _get(body, "logprobs", (bool,), False)
    top = _get(body, "top_logprobs", (int,), 0)
    if not 0 <= top <= cfg.max_logprobs:
        raise bad(f"'top_logprobs' must be in 0..{cfg.max_logprobs}, got {top}", "top_logprobs")
    if top and not logprobs:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    forced = tools.forced_schema() if tools else None
    return _common(body, cfg, model, "chat", _truncate([ids], body, max_len), max_len, logprobs, top,
                   echo_texts=[echo_prefix(body)], grammar=grammar_for(body, forced), tools=tools)
