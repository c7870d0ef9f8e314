"""The batched sampler (parameters: fastserve.common.sampling_params).

A seeded job's draw for its n-th generated token comes from a generator seeded
with (seed, n) alone, so its output does not depend on which jobs share the
batch or on preemption and swapping."""
from __future__ import annotations

from fastserve.common.sampling_params import SamplingParams

_MASK64 = (1 << 63) - 1


def _seeded_uniform(seed: int, num_generated: int):
    import torch

    g = torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + num_generated) & _MASK64)
    return torch.rand((), generator=g).item()


def sample(logits, params: list[SamplingParams], num_generated: list[int], generator=None):
    """logits: float32 (B, V). Returns (token_ids, logprobs, top_logprobs):
    logprobs are those of the model's own distribution (before temperature,
    top-k and top-p), like vLLM's default."""
    import torch

    B = logits.shape[0]
    assert len(params) == B == len(num_generated)
    tokens = logits.argmax(dim=-1)
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if random_rows:
        rows = torch.tensor(random_rows, device=logits.device)
        temps = torch.tensor([params[i].temperature for i in random_rows], device=logits.device)
        sub = logits.index_select(0, rows) / temps[:, None]
        sorted_logits, sorted_idx = sub.sort(dim=-1, descending=True, stable=True)
        V = sub.shape[-1]
        ranks = torch.arange(V, device=logits.device)
        top_k = torch.tensor([params[i].top_k if params[i].top_k > 0 else V for i in random_rows],
                             device=logits.device)
        sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
        top_p = torch.tensor([params[i].top_p for i in random_rows], device=logits.device)
        if (top_p < 1.0).any():
            probs = sorted_logits.softmax(dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs
            drop = (mass_before >= top_p[:, None]) & (ranks[None, :] > 0)
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        cdf = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        u = []
        for i in random_rows:
            p = params[i]
            if p.seed is not None:
                u.append(_seeded_uniform(p.seed, num_generated[i]))
            else:
                u.append(torch.rand((), generator=generator).item())
        u = torch.tensor(u, device=logits.device, dtype=cdf.dtype)[:, None] * cdf[:, -1:]
        pick = torch.searchsorted(cdf, u).clamp_(max=V - 1)
        tokens[rows] = sorted_idx.gather(1, pick).squeeze(1)

    want_lp = [p.logprobs for p in params]
    token_list = tokens.tolist()
    tops: list[list[tuple[int, float]] | None] = [None] * B
    # The chosen token's logprob is cheap and always returned.
    logp = logits.log_softmax(dim=-1)
    logprobs = logp.gather(1, tokens[:, None]).squeeze(1).tolist()
    kmax = max(k or 0 for k in want_lp)
    if kmax:
        top_v, top_i = logp.topk(min(kmax, logp.shape[-1]), dim=-1)
        top_v, top_i = top_v.tolist(), top_i.tolist()
        for i, k in enumerate(want_lp):
            if k:
                tops[i] = list(zip(top_i[i][:k], top_v[i][:k]))
    return token_list, logprobs, tops
