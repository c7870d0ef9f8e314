"""The batched sampler (parameters: fastserve.common.sampling_params).

One pass over the batch's (B, V) logits, in vLLM's order: allowed token ids,
bad words, min_tokens, logit_bias, then the repetition, frequency and
presence penalties (all of which can change the argmax), the grammar mask;
then greedy rows take the argmax, the others are divided by their
temperature, cut by min_p, top-k and top-p, and drawn. Each step builds its
index tensors from flat Python lists, so the torch work is a fixed number of
batched ops whatever the batch holds.

A seeded job's draw for its n-th generated token comes from a generator seeded
with (seed, n) alone, so its output does not depend on which jobs share the
batch or on preemption and swapping. The returned logprobs are those of the
model's own distribution (before any processing), like vLLM's default."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastserve.common.sampling_params import SamplingParams
from fastserve.gpu_worker.job_state import JobState

_MASK64 = (1 << 63) - 1
_NEG_INF = float("-inf")


def _seeded_uniform(seed: int, num_generated: int) -> float:
    g = torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + num_generated) & _MASK64)
    return torch.rand((), generator=g).item()


@dataclass
class SampleRow:
    """One row of the batch to sample: its parameters, tokens generated so
    far, and the engine's state for the job (None for plain sampling)."""

    params: SamplingParams
    num_generated: int = 0
    state: JobState | None = None


class PenaltyPool:
    """Per-job token counts for the penalties, one row per job that has any,
    on the logits' device: (slots, V) float32 counts of the generated tokens
    and a (slots, V) bool mask of every token seen (prompt and output). A step
    gathers its jobs' rows with one index_select instead of recounting every
    token it has seen."""

    def __init__(self, vocab_size: int, device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.counts = torch.zeros((0, vocab_size), dtype=torch.float32, device=device)
        self.seen = torch.zeros((0, vocab_size), dtype=torch.bool, device=device)
        self._free: list[int] = []

    def acquire(self) -> int:
        if not self._free:
            n = self.counts.shape[0]
            grow = max(8, n)
            self.counts = torch.cat([self.counts, self.counts.new_zeros((grow, self.vocab_size))])
            self.seen = torch.cat([self.seen, self.seen.new_zeros((grow, self.vocab_size))])
            self._free = list(range(n + grow - 1, n - 1, -1))
        return self._free.pop()

    def release(self, slot: int) -> None:
        self.counts[slot].zero_()
        self.seen[slot].zero_()
        self._free.append(slot)

    def sync(self, rows: list[SampleRow]) -> None:
        """Count the tokens fed since the last step into each row's slot."""
        seen_slots, seen_toks, out_slots, out_toks, reset = [], [], [], [], []
        for r in rows:
            st = r.state
            if st.slot < 0:
                st.slot = self.acquire()
                seen_slots.extend([st.slot] * st.prompt_len)
                seen_toks.extend(st.tokens[:st.prompt_len])
            if st.counted > r.num_generated:  # fed again shorter than counted: recount from scratch
                reset.append(st.slot)
                seen_slots.extend([st.slot] * st.prompt_len)
                seen_toks.extend(st.tokens[:st.prompt_len])
                st.counted = 0
            new = st.output(st.counted)
            out_slots.extend([st.slot] * len(new))
            out_toks.extend(new)
            st.counted += len(new)
        if reset:
            r_idx = torch.tensor(reset, device=self.device)
            self.counts[r_idx] = 0
            self.seen[r_idx] = False
        if out_toks:
            s_idx = torch.tensor(out_slots, device=self.device)
            t_idx = torch.tensor(out_toks, device=self.device)
            self.counts.index_put_((s_idx, t_idx), torch.ones(len(out_toks), device=self.device), accumulate=True)
            seen_slots.extend(out_slots)
            seen_toks.extend(out_toks)
        if seen_toks:
            self.seen[torch.tensor(seen_slots, device=self.device), torch.tensor(seen_toks, device=self.device)] = True


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: tuple[int, ...], device) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.device = torch.device(device)
        self.penalties = PenaltyPool(vocab_size, self.device)
        self._may_ban_all = False

    def release(self, state: JobState) -> None:
        if state.slot >= 0:
            self.penalties.release(state.slot)
            state.slot = -1

    def sample(self, logits: torch.Tensor, rows: list[SampleRow], generator=None, grammar_mask=None):
        """logits: float32 (B, V), one row per SampleRow. grammar_mask: None or
        (row indices, (len, ceil(V / 32)) int32 bitmask) from Grammars.
        Returns (token_ids, logprobs, top_logprobs)."""
        B, V = logits.shape
        assert len(rows) == B
        logp = logits.log_softmax(dim=-1)  # the model's own distribution, for the returned logprobs
        processed = self.process(logits, rows, grammar_mask)
        tokens = processed.argmax(dim=-1)
        random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
        if random_rows:
            tokens[torch.tensor(random_rows, device=logits.device)] = self._draw(
                processed, [rows[i] for i in random_rows], random_rows, generator)
        if self._may_ban_all:
            # No token allowed at all (constraints that contradict each other,
            # e.g. min_tokens with a finished grammar): end the job with EOS.
            dead = torch.isneginf(processed.max(dim=-1).values)
            if self.eos_token_ids and bool(dead.any()):
                tokens = torch.where(dead, torch.full_like(tokens, self.eos_token_ids[0]), tokens)
        token_list = tokens.tolist()
        logprobs = logp.gather(1, tokens[:, None]).squeeze(1).tolist()
        tops: list[list[tuple[int, float]] | None] = [None] * B
        kmax = max(r.params.logprobs or 0 for r in rows)
        if kmax:
            top_v, top_i = logp.topk(min(kmax, V), dim=-1)
            top_v, top_i = top_v.tolist(), top_i.tolist()
            for i, r in enumerate(rows):
                k = r.params.logprobs
                if k:
                    tops[i] = list(zip(top_i[i][:k], top_v[i][:k]))
        return token_list, logprobs, tops

    # ------------------------------------------------------------------ processors that can move the argmax
    def process(self, logits: torch.Tensor, rows: list[SampleRow], grammar_mask=None) -> torch.Tensor:
        """The logits after the processors that can change the argmax (a
        new tensor, or `logits` itself when no row has any)."""
        dev = logits.device
        allowed, banned, bias = [], [], []  # flat (row, token[, bias]) lists
        pen = []
        for i, r in enumerate(rows):
            p = r.params
            if p.allowed_token_ids is not None:
                allowed.extend((i, t) for t in p.allowed_token_ids)
            if p.bad_words:
                banned.extend((i, t) for t in _bad_word_bans(p.bad_words, r.state.output(0)))
            if r.num_generated < p.min_tokens:
                banned.extend((i, t) for t in p.stop_token_ids)
                banned.extend((i, t) for t in self.eos_token_ids)
            if p.logit_bias:
                bias.extend((i, t, b) for t, b in p.logit_bias)
            if p.has_penalties:
                pen.append(i)
        # Only bans and masks can leave a row with no token at all (biases are finite).
        self._may_ban_all = bool(allowed or banned or grammar_mask is not None)
        if not (allowed or banned or bias or pen or grammar_mask is not None):
            return logits
        out = logits.clone()
        if allowed:
            keep = torch.ones_like(out, dtype=torch.bool)
            keep[torch.tensor(sorted({i for i, _ in allowed}), device=dev)] = False
            idx = torch.tensor(allowed, device=dev).T
            keep[idx[0], idx[1]] = True
            out.masked_fill_(~keep, _NEG_INF)
        if banned:
            idx = torch.tensor(banned, device=dev).T
            out[idx[0], idx[1]] = _NEG_INF
        if bias:
            r_idx = torch.tensor([i for i, _, _ in bias], device=dev)
            t_idx = torch.tensor([t for _, t, _ in bias], device=dev)
            out.index_put_((r_idx, t_idx), torch.tensor([b for _, _, b in bias], device=dev, dtype=out.dtype),
                           accumulate=True)
        if pen:
            self._apply_penalties(out, rows, pen)
        if grammar_mask is not None:
            g_rows, bitmask = grammar_mask
            bits = (bitmask.to(dev)[:, :, None] >> torch.arange(32, device=dev, dtype=torch.int32)) & 1
            ok = bits.reshape(bits.shape[0], -1)[:, :out.shape[1]].bool()
            g_idx = torch.tensor(g_rows, device=dev)
            out[g_idx] = out[g_idx].masked_fill(~ok, _NEG_INF)
        return out

    def _apply_penalties(self, out: torch.Tensor, rows: list[SampleRow], pen: list[int]) -> None:
        """In place, on the (row, token) pairs a job has seen only: every
        other logit is untouched by the three penalties, and the seen tokens
        are few next to the vocabulary."""
        pool = self.penalties
        pool.sync([rows[i] for i in pen])
        dev = out.device
        slots = torch.tensor([rows[i].state.slot for i in pen], device=dev)
        params = [rows[i].params for i in pen]
        k, t = pool.seen.index_select(0, slots).nonzero(as_tuple=True)  # (K,) rows of pen, (K,) token ids
        r = torch.tensor(pen, device=dev)[k]
        x = out[r, t]
        rep = torch.tensor([p.repetition_penalty for p in params], device=dev)[k]
        # Repetition (prompt and output tokens): shrink a positive logit, grow a negative one.
        x = torch.where(x > 0, x / rep, x * rep)
        # Frequency and presence (output tokens only), as OpenAI defines them.
        counts = pool.counts[slots[k], t]
        freq = torch.tensor([p.frequency_penalty for p in params], device=dev)[k]
        pres = torch.tensor([p.presence_penalty for p in params], device=dev)[k]
        out[r, t] = x - freq * counts - pres * (counts > 0)

    # ------------------------------------------------------------------ the draw
    def _draw(self, logits: torch.Tensor, rows: list[SampleRow], index: list[int], generator) -> torch.Tensor:
        """Inverse-CDF draws. Rows with top-k or top-p are sorted first (the
        cut needs the order); the others draw in vocabulary order, which
        spares a (B, V) sort. Which path a row takes depends on its own
        parameters only, so its draw never depends on the batch."""
        dev = logits.device
        idx = torch.tensor(index, device=dev)
        temps = torch.tensor([r.params.temperature for r in rows], device=dev)
        sub = logits.index_select(0, idx) / temps[:, None]
        min_p = torch.tensor([r.params.min_p for r in rows], device=dev)
        if bool((min_p > 0).any()):
            probs = sub.softmax(dim=-1)
            floor = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
            sub = sub.masked_fill(probs < floor, _NEG_INF)
        u = torch.tensor([_seeded_uniform(r.params.seed, r.num_generated) if r.params.seed is not None
                          else torch.rand((), generator=generator).item() for r in rows], device=dev)
        V = sub.shape[-1]
        out = torch.empty(len(rows), dtype=torch.long, device=dev)
        cut = [j for j, r in enumerate(rows) if r.params.top_k > 0 or r.params.top_p < 1.0]
        whole = [j for j, r in enumerate(rows) if not (r.params.top_k > 0 or r.params.top_p < 1.0)]
        if whole:
            w = torch.tensor(whole, device=dev)
            cdf = sub.index_select(0, w).softmax(dim=-1).cumsum(dim=-1)
            # u > 0: the first index whose cdf reaches u * total then has a positive probability.
            v = u[w].clamp_min(1e-7) * cdf[:, -1]
            out[w] = torch.searchsorted(cdf, v.unsqueeze(1)).squeeze(1).clamp_(max=V - 1)
        if cut:
            c = torch.tensor(cut, device=dev)
            sorted_logits, sorted_idx = sub.index_select(0, c).sort(dim=-1, descending=True, stable=True)
            ranks = torch.arange(V, device=dev)
            top_k = torch.tensor([rows[j].params.top_k if rows[j].params.top_k > 0 else V for j in cut], device=dev)
            sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= top_k[:, None], _NEG_INF)
            top_p = torch.tensor([rows[j].params.top_p for j in cut], device=dev)
            if bool((top_p < 1.0).any()):
                probs = sorted_logits.softmax(dim=-1)
                mass_before = probs.cumsum(dim=-1) - probs
                drop = (mass_before >= top_p[:, None]) & (ranks[None, :] > 0)
                sorted_logits = sorted_logits.masked_fill(drop, _NEG_INF)
            cdf = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            pick = torch.searchsorted(cdf, (u[c] * cdf[:, -1]).unsqueeze(1)).clamp_(max=V - 1)
            out[c] = sorted_idx.gather(1, pick).squeeze(1)
        return out


def _bad_word_bans(bad_words: tuple[tuple[int, ...], ...], output: list[int]) -> list[int]:
    """vLLM's bad words: a word's last token is banned when the output ends
    with the rest of the word (a one-token word is always banned)."""
    banned = []
    for word in bad_words:
        prefix = len(word) - 1
        if prefix > len(output):
            continue
        if prefix == 0 or tuple(output[-prefix:]) == word[:-1]:
            banned.append(word[-1])
    return banned


def sample(logits, params: list[SamplingParams], num_generated: list[int], generator=None):
    """Sampling without engine state (no penalties, bad words or grammar)."""
    sampler = Sampler(logits.shape[-1], (), logits.device)
    return sampler.sample(logits, [SampleRow(p, n) for p, n in zip(params, num_generated)], generator)
