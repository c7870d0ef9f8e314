"""What one engine iteration consumes and produces (plain data, no tensors)."""
from __future__ import annotations

from dataclasses import dataclass, field

from fastserve.common.sampling_params import SamplingParams


@dataclass
class SeqWork:
    """One job's share of an iteration.

    token_ids: the new tokens of this iteration (a whole prompt, a prompt
    chunk, or the one token sampled last time). num_computed: tokens already in
    the KV cache, i.e. the position of token_ids[0]. block_table: GPU block ids
    covering num_computed + len(token_ids) tokens. num_generated: tokens
    generated so far (the seeded sampler draws from (seed, num_generated)).
    sample=False for a prefill chunk that is not the last one."""

    job_id: str
    token_ids: list[int]
    num_computed: int
    block_table: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    num_generated: int = 0
    sample: bool = True

    @property
    def num_tokens(self) -> int:
        return self.num_computed + len(self.token_ids)


@dataclass
class SeqResult:
    job_id: str
    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]] | None = None
    # With the job's first token, when prompt_logprobs was asked for: per
    # prompt position from 1, (logprob, rank, [(token id, logprob) of the top k]).
    prompt_logprobs: list[tuple[float, int, list[tuple[int, float]]]] | None = None


# token_ids=[PENDING_TOKEN] in a batch submitted to a PipelineLeader: the
# token this job samples in an earlier batch still in flight (a decode job in
# consecutive batches). Stage 0 waits for it; the single Engine rejects it.
PENDING_TOKEN = -1
