"""What the engine remembers about a job between iterations, for the sampling
parameters that look back at the sequence: penalties and bad words (the
tokens so far), structured output (the grammar matcher), prompt logprobs
(those of earlier prefill chunks).

A job gets a `JobState` the first time the engine sees it with such a
parameter; jobs without any never get one, so plain sampling pays nothing.
The state follows the tokens the engine is *fed* (every SeqWork's token_ids
at their positions), not the tokens it samples: a token sampled but never fed
back (computed past the end, discarded) does not count, and a job prefilled
again after its KV was dropped feeds the same tokens at the same positions.
Whoever runs the engine frees states with `Engine.release(job_ids)`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastserve.common.sampling_params import SamplingParams


def needs_state(p: SamplingParams) -> bool:
    return p.has_penalties or bool(p.bad_words) or p.grammar is not None or p.prompt_logprobs is not None


@dataclass
class JobState:
    params: SamplingParams
    tokens: list[int] = field(default_factory=list)  # every token fed so far, by position
    prompt_len: int | None = None  # known at the first sampled step: num_tokens - num_generated
    counted: int = 0  # output positions [prompt_len, counted) are in the penalty counts
    slot: int = -1  # row in the sampler's penalty pools (-1: none)
    matcher: Any = None  # llguidance.LLMatcher
    consumed: int = 0  # output tokens the matcher has consumed
    # prompt logprobs of earlier chunks: (logprob, rank, top) per prompt position from 1
    prompt_logprobs: list = field(default_factory=list)
    pending_row: Any = None  # log-softmax of a chunk's last row: it predicts the next chunk's first token
    prompt_logprobs_sent: bool = False

    def feed(self, position: int, token_ids: list[int]) -> None:
        if position > len(self.tokens):
            raise ValueError(f"tokens fed at position {position} but only {len(self.tokens)} are known")
        if position < len(self.tokens):
            # Fed again (a prefill after the KV was dropped): the same tokens.
            del self.tokens[position:]
        self.tokens.extend(token_ids)

    def output(self, start: int) -> list[int]:
        """Output tokens from output index `start` on."""
        assert self.prompt_len is not None
        return self.tokens[self.prompt_len + start:]


class JobStates:
    def __init__(self) -> None:
        self._states: dict[str, JobState] = {}
        self._released: list[str] = []

    def get(self, job_id: str) -> JobState | None:
        return self._states.get(job_id)

    def get_or_create(self, job_id: str, params: SamplingParams) -> JobState:
        state = self._states.get(job_id)
        if state is None:
            state = self._states[job_id] = JobState(params)
        return state

    def release(self, job_ids) -> None:
        """May be called from another thread than the one stepping: the ids
        are only queued here and dropped at the next `take_released()`."""
        self._released.extend(job_ids)

    def take_released(self) -> list[JobState]:
        ids, self._released = self._released, []
        return [s for s in (self._states.pop(j, None) for j in ids) if s is not None]

    def __len__(self) -> int:
        return len(self._states)
