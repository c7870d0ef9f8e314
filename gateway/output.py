"""One choice's output: token events in, text deltas out.

Text is detokenized incrementally (never half a UTF-8 character) and checked
for stop strings across token boundaries: text that could be the beginning of
a stop string is held back until the next tokens show whether it is one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fastserve.common.schemas import TokenEvent
from fastserve.common.tokenizer import IncrementalDetokenizer

from fastserve.gateway.model_info import ModelInfo


@dataclass
class TokenLogprob:
    token_id: int
    text: str
    logprob: float | None  # None: the first token of an echoed prompt
    top: list[tuple[int, str, float]]  # (token id, text, logprob) alternatives


@dataclass
class Delta:
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class ChoiceOutput:
    """prefix: text that comes before the output (echo), in the first delta
    and the full text; stop strings are looked for only after it. discard:
    the output is dropped (echo with max_tokens 0), only the prefix shows."""

    def __init__(self, index: int, model: ModelInfo, prompt_ids: list[int], stop: list[str], *,
                 include_stop: bool = False, logprobs: bool = False, skip_special_tokens: bool = True,
                 prefix: str = "", discard: bool = False) -> None:
        self.index = index
        self.model = model
        self.prompt_ids = prompt_ids
        self.prompt_len = len(prompt_ids)
        self.stop = stop
        self.include_stop = include_stop
        self.want_logprobs = logprobs
        self.discard = discard
        self.detok = IncrementalDetokenizer(model.tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens)
        self.text = prefix  # everything decoded so far, held-back text included
        self.prefix_len = len(prefix)
        self.emitted = 0  # characters of self.text already handed out
        self.num_tokens = 0
        self.token_ids: list[int] = []  # generated, as they came
        self.finish_reason: str | None = None
        self.stopped_by_string = False  # the job is still running: the caller must cancel it
        self.error: str | None = None
        self.all_logprobs: list[TokenLogprob] = []
        self.cumulative_logprob = 0.0  # of the tokens kept (best_of ranks by it)
        self.prompt_logprobs: list | None = None  # from the engine, with the first token

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    @property
    def output_text(self) -> str:
        return self.text[: self.emitted]

    def add(self, ev: TokenEvent) -> Delta:
        assert not self.finished, f"event for finished choice {self.index}"
        delta = Delta()
        if ev.error is not None:
            self.error = ev.error
            return delta
        if ev.prompt_logprobs is not None:
            self.prompt_logprobs = ev.prompt_logprobs
        if self.discard:
            self.finish_reason = "length" if ev.finish_reason is not None else None
            delta.text, self.emitted = self.text[self.emitted:], len(self.text)
            delta.finish_reason = self.finish_reason
            return delta
        self.num_tokens += len(ev.token_ids)
        self.token_ids.extend(ev.token_ids)
        if ev.logprobs:
            self.cumulative_logprob += sum(ev.logprobs)
        if self.want_logprobs:
            delta.logprobs = self._logprobs(ev)
            self.all_logprobs.extend(delta.logprobs)
        self.text += self.detok.add(ev.token_ids) if ev.token_ids else ""
        if ev.finish_reason is not None:
            self.text += self.detok.flush()
        start = self.emitted
        hit = self._find_stop(max(start, self.prefix_len))
        if hit is not None:
            idx, s = hit
            end = idx + len(s) if self.include_stop else idx
            self.text = self.text[:end]
            self.finish_reason = "stop"
            self.stopped_by_string = ev.finish_reason is None
        elif ev.finish_reason is not None:
            end = len(self.text)
            self.finish_reason = "stop" if ev.finish_reason == "abort" else ev.finish_reason
        else:
            end = max(self.prefix_len, len(self.text) - held_back(self.text[self.prefix_len:], self.stop))
        delta.text = self.text[start:end]
        self.emitted = max(self.emitted, end)
        delta.finish_reason = self.finish_reason
        return delta

    def _find_stop(self, start: int) -> tuple[int, str] | None:
        best = None
        for s in self.stop:
            i = self.text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        return best

    def _logprobs(self, ev: TokenEvent) -> list[TokenLogprob]:
        out = []
        lps = ev.logprobs or [0.0] * len(ev.token_ids)
        tops = ev.top_logprobs or [None] * len(ev.token_ids)
        for tid, lp, top in zip(ev.token_ids, lps, tops):
            alts = [(t.token_id, self.model.token_text(t.token_id), t.logprob) for t in (top or [])]
            out.append(TokenLogprob(tid, self.model.token_text(tid), float(lp), alts))
        return out
