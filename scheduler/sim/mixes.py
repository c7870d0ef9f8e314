"""Workload mixes: named blends of request families, each family with its own
input and output length distributions and the correlation between them.

Lengths are in tokens and must fit the `small` model's 2048-token context
(workload.MAX_TOTAL): where a published distribution does not, it is scaled
or clipped and the comment says so. Every number is either sourced or marked
ASSUMPTION; the correlation of input and output lengths is unpublished for
every source used here, so all of them are assumptions.

A family samples (log input, log output) from a bivariate normal: lognormal
marginals with the given means and coefficients of variation, and `rho` the
correlation of the logs. Clipping (inputs to [min_input, max_input], outputs to
[1, MAX_TOTAL - input]) moves the realised means a little below the nominal
ones where the tail is cut.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Family:
    input_mean: float
    input_cv: float
    output_mean: float
    output_cv: float
    rho: float  # correlation of log input and log output length
    max_input: int
    min_input: int = 1

    def __post_init__(self) -> None:
        assert self.input_mean > 0 and self.output_mean > 0 and self.input_cv > 0 and self.output_cv > 0
        assert -1 < self.rho < 1 and 1 <= self.min_input <= self.max_input


FAMILIES = {
    # One chat turn. Means: LMSYS-Chat-1M (Zheng et al., ICLR 2024, Table 1):
    # 69.5 tokens per prompt, 214.5 per response. CVs (1.5 in, 1.0 out) and
    # rho = 0.1: ASSUMPTIONS (heavy-tailed pasted prompts; longer questions
    # get slightly longer answers).
    "chat-turn": Family(69.5, 1.5, 214.5, 1.0, rho=0.1, max_input=1024),
    # Summarising a news article. CNN/DailyMail (See et al., ACL 2017, section 4):
    # articles of 781 and summaries of 56 word tokens on average; x1.3 subword
    # tokens per word (ASSUMPTION) gives 1015 and 73. CVs (0.45 in, 0.4 out)
    # and rho = 0.3 (longer articles, somewhat longer summaries): ASSUMPTIONS.
    "summary": Family(1015, 0.45, 73, 0.4, rho=0.3, max_input=1900, min_input=200),
    # Retrieval-augmented / agentic answer: a long context of retrieved passages
    # or tool history and a short answer. Azure LLM inference trace 2023,
    # "conversation" (Splitwise, Patel et al., ISCA 2024): median prompt 1020,
    # median output 129 tokens; the means here follow from those medians and
    # the CVs (0.4 in, 0.8 out: ASSUMPTIONS). rho = 0: ASSUMPTION.
    "rag-answer": Family(1020 * math.sqrt(1 + 0.4 ** 2), 0.4, 129 * math.sqrt(1 + 0.8 ** 2), 0.8, rho=0.0,
                         max_input=1800, min_input=100),
    # Code completion in an editor: a file prefix and a few lines back. Azure
    # LLM inference trace 2023, "coding" (Splitwise): median prompt 1500, median
    # output 13 tokens. The trace's prompts run to 8k tokens; to fit the 2048-token
    # context the prompt median is scaled to 1024 (ASSUMPTION) with CV 0.45; output
    # CV 0.8 and rho = 0: ASSUMPTIONS.
    "code-completion": Family(1024 * math.sqrt(1 + 0.45 ** 2), 0.45, 13 * math.sqrt(1 + 0.8 ** 2), 0.8, rho=0.0,
                              max_input=1900, min_input=32),
}

# Mixes by request share. `summarization` and `rag` are the two mixes that
# skip-join MLFQ lost on (issue 13); `code`'s 30% chat (an assistant's chat
# pane beside completions) is an ASSUMPTION.
MIXES = {
    "chat": {"chat-turn": 1.0},
    "summarization": {"chat-turn": 0.5, "summary": 0.5},
    "rag": {"rag-answer": 0.7, "chat-turn": 0.3},
    "code": {"code-completion": 0.7, "chat-turn": 0.3},
}


def _log_params(mean: float, cv: float) -> tuple[float, float]:
    sigma2 = math.log(1 + cv * cv)
    return math.log(mean) - sigma2 / 2, math.sqrt(sigma2)


def sample_family(rng: np.random.Generator, fam: Family, n: int, max_total: int) -> tuple[np.ndarray, np.ndarray]:
    """n (input, output) length pairs of one family, clipped to the context."""
    mi, si = _log_params(fam.input_mean, fam.input_cv)
    mo, so = _log_params(fam.output_mean, fam.output_cv)
    z = rng.standard_normal((2, n))
    z_out = fam.rho * z[0] + math.sqrt(1 - fam.rho ** 2) * z[1]
    inputs = np.clip(np.rint(np.exp(mi + si * z[0])), fam.min_input, fam.max_input).astype(int)
    outputs = np.clip(np.rint(np.exp(mo + so * z_out)), 1, max_total - inputs).astype(int)
    return inputs, outputs


def sample_mix(rng: np.random.Generator, name: str, n: int, max_total: int) -> tuple[np.ndarray, np.ndarray]:
    """n (input, output) length pairs of a mix, its families interleaved at random."""
    shares = MIXES[name]
    names = list(shares)
    which = rng.choice(len(names), size=n, p=np.array([shares[f] for f in names]) / sum(shares.values()))
    inputs = np.empty(n, dtype=int)
    outputs = np.empty(n, dtype=int)
    for k, fam in enumerate(names):
        idx = np.flatnonzero(which == k)
        inputs[idx], outputs[idx] = sample_family(rng, FAMILIES[fam], len(idx), max_total)
    return inputs, outputs
