"""Sampling parameters of one job: what the gateway validates, the scheduler
uses for stopping, and the worker samples with. Plain data, no torch.

Every field is a plain type (numbers, strings, tuples of ints, X | None) so
that the parameters can travel field by field in a typed wire struct. The
semantics are vLLM's (vllm/sampling_params.py and its v1 sampler):
presence/frequency penalties count the generated tokens, the repetition
penalty every token of prompt and output; min_p is relative to the most likely
token after temperature; min_tokens bans EOS and the stop tokens until that
many tokens exist; a temperature under 1e-5 is greedy."""
from __future__ import annotations

import math
from dataclasses import dataclass

SEED_LIMIT = 2**64  # seeds are unsigned 64-bit; the gateway maps negative ones into range
GREEDY_TEMPERATURE = 1e-5  # vLLM's _SAMPLING_EPS: below it sampling is argmax
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's and vLLM's clamp of a logit_bias value


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    min_p: float = 0.0  # 0: off
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: chosen token only; k: also the top k
    prompt_logprobs: int | None = None  # None: none; k: each prompt token's logprob and the top k
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # (token id, bias) pairs, token ids unique; the bias is added to the logit
    logit_bias: tuple[tuple[int, float], ...] = ()
    allowed_token_ids: tuple[int, ...] | None = None  # None: every token
    bad_words: tuple[tuple[int, ...], ...] = ()  # token sequences whose last token is banned after the rest
    grammar: str | None = None  # llguidance grammar (JSON schema, regex, choice, Lark) the output must match

    def __post_init__(self) -> None:
        for name in ("max_tokens", "min_tokens", "top_k", "seed", "logprobs", "prompt_logprobs"):
            if isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], "
                             f"got {self.min_tokens!r}")
        if not (self.temperature >= 0.0) or not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or (self.top_k < 1 and self.top_k != -1):
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k!r}")
        if not (0.0 <= self.min_p <= 1.0):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < SEED_LIMIT):
            raise ValueError(f"seed must be None or an integer in [0, 2**64), got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0):
                raise ValueError(f"{name} must be None or an integer >= 0, got {v!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0.0):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")
        object.__setattr__(self, "stop_token_ids", _ids(self.stop_token_ids, "stop_token_ids"))
        bias = tuple((_id(t, "logit_bias"), float(b)) for t, b in self.logit_bias)
        if len({t for t, _ in bias}) != len(bias):
            raise ValueError("logit_bias names a token id twice")
        if any(not abs(b) <= LOGIT_BIAS_LIMIT for _, b in bias):
            raise ValueError(f"logit_bias values must be in [-{LOGIT_BIAS_LIMIT:g}, {LOGIT_BIAS_LIMIT:g}]")
        object.__setattr__(self, "logit_bias", bias)
        if self.allowed_token_ids is not None:
            allowed = _ids(self.allowed_token_ids, "allowed_token_ids")
            if not allowed:
                raise ValueError("allowed_token_ids must not be empty (None allows every token)")
            object.__setattr__(self, "allowed_token_ids", allowed)
        words = tuple(_ids(w, "bad_words") for w in self.bad_words)
        if any(not w for w in words):
            raise ValueError("bad_words entries must hold at least one token id")
        object.__setattr__(self, "bad_words", words)
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar):
            raise ValueError("grammar must be None or a non-empty string")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def finish_reason(self, token_id: int, num_generated: int, eos_token_ids) -> str | None:
        """num_generated counts token_id itself. Before min_tokens only the
        length stops a job (the sampler bans the stop tokens until then)."""
        if num_generated >= self.min_tokens and (
                token_id in self.stop_token_ids or (not self.ignore_eos and token_id in eos_token_ids)):
            return "stop"
        if num_generated >= self.max_tokens:
            return "length"
        return None

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["stop_token_ids"] = list(self.stop_token_ids)
        d["logit_bias"] = [list(p) for p in self.logit_bias]
        d["allowed_token_ids"] = None if self.allowed_token_ids is None else list(self.allowed_token_ids)
        d["bad_words"] = [list(w) for w in self.bad_words]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingParams":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__ and v is not None}
        for key in ("stop_token_ids", "allowed_token_ids"):
            if key in known:
                known[key] = tuple(known[key])
        if "logit_bias" in known:
            known["logit_bias"] = tuple(tuple(p) for p in known["logit_bias"])
        if "bad_words" in known:
            known["bad_words"] = tuple(tuple(w) for w in known["bad_words"])
        return cls(**known)


def _id(t, name: str) -> int:
    if isinstance(t, bool) or not isinstance(t, int) or t < 0:
        raise ValueError(f"{name} must hold token ids (integers >= 0), got {t!r}")
    return t


def _ids(values, name: str) -> tuple[int, ...]:
    return tuple(_id(t, name) for t in values)
