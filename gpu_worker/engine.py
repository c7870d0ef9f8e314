"""Engine: one model replica on one device, or one rank's shard of a replica
split over pipeline stages and tensor-parallel ranks (the ranks are driven
by stage.py). It owns the weights and the KV block pools, but not the
allocation of blocks: whoever calls step() (the scheduler, or the offline
LLM) decides which blocks each job uses; every rank of a split replica uses
the same block ids and holds the KV of its own layers and heads."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import torch

from fastserve.gpu_worker.batch import SeqResult, SeqWork
from fastserve.common.model_config import ModelConfig
from fastserve.common.model_split import ModelSplit
from fastserve.gpu_worker.kv_cache import CopyHandle, KVCache
from fastserve.gpu_worker.loader import load_weights, torch_dtype
from fastserve.gpu_worker.model import FreshPrefills, LlamaModel, PrefillSpan, StepInputs
from fastserve.gpu_worker.job_state import JobStates, needs_state
from fastserve.gpu_worker.sampling import SampleRow, Sampler
from fastserve.gpu_worker.tp_comm import TPComm

# Default device KV pool on the CPU when none is given: this many full-length
# sequences, capped by _CPU_KV_BYTES.
_CPU_DEFAULT_SEQS = 32
_CPU_KV_BYTES = 2 * 2**30
_GPU_MEMORY_FRACTION = 0.85
# Prompts are padded into one attention call only while the (P, L, L) mask
# stays small; past it, each prompt attends on its own.
_MAX_FRESH_MASK = 64 * 2**20


def check_unique(work: list[SeqWork]) -> None:
    ids = [w.job_id for w in work]
    if len(set(ids)) != len(ids):
        raise ValueError("a job appears twice in one step")


class Engine:
    def __init__(self, model_dir: str | Path, *, dtype: str = "float32", device: str = "cpu", block_size: int = 16,
                 num_gpu_blocks: int | None = None, num_host_blocks: int = 0, host_kv_buffer=None,
                 cpu_prepack: bool = True, split: ModelSplit | None = None, rank: int = 0, tp: TPComm | None = None,
                 agree_num_blocks: Callable[[int], int] | None = None):
        """split, rank: the part of the model this engine holds (default: all
        of it); tp: its tensor-parallel peers. host_kv_buffer is the whole
        shared host pool: a rank uses its chunk of every block. With
        num_gpu_blocks=None each rank sizes its pool from its memory and
        agree_num_blocks (e.g. a min over ranks) makes the counts equal."""
        from fastserve.common.tokenizer import load_tokenizer

        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.model_dir = Path(model_dir)
        self.model_config = ModelConfig.from_model_dir(self.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but torch sees no CUDA device")
        self.dtype_name = dtype
        self.dtype = torch_dtype(dtype)
        self.block_size = block_size
        cfg = self.model_config
        self.split = split or ModelSplit(cfg)
        stage, tp_rank = self.split.coords(rank)
        self.shard = self.split.shard(stage, tp_rank)
        weights = load_weights(self.model_dir, cfg, dtype, self.device, self.shard)
        # cpu_prepack: oneDNN-packed weights on the CPU (faster; float rounding
        # differs from F.linear's MKL GEMM in the last bits).
        self.model = LlamaModel(cfg, weights, self.device, self.dtype, prepack=cpu_prepack, shard=self.shard, tp=tp)
        if num_gpu_blocks is None:
            num_gpu_blocks = self._default_num_blocks()
            if agree_num_blocks is not None:
                num_gpu_blocks = agree_num_blocks(num_gpu_blocks)
        self.num_gpu_blocks = num_gpu_blocks
        if self.num_gpu_blocks < 1:
            raise ValueError(f"num_gpu_blocks must be >= 1, got {self.num_gpu_blocks}")
        # Every host block holds one chunk per rank (common/model_split.py); a
        # whole, unsplit replica's chunk is the whole block.
        self.pool_bytes_per_block = self.split.kv_bytes_per_block(block_size, dtype)
        host_chunk = (self.split.host_chunk(stage, tp_rank, block_size, dtype)[0], self.pool_bytes_per_block)
        self.kv = KVCache(self.shard.num_layers, self.shard.num_kv_heads, cfg.head_dim, block_size,
                          self.num_gpu_blocks, num_host_blocks, self.dtype, self.device, host_kv_buffer, host_chunk)
        self.num_host_blocks = self.kv.num_host_blocks
        self.bytes_per_block = self.kv.bytes_per_block
        # Unseeded requests draw from this; seeded ones never touch it (sampling.py).
        self.generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        self.sampler = Sampler(cfg.vocab_size, cfg.eos_token_ids, self.device)
        self.states = JobStates()
        self._grammars = None
        self.last_step_seconds = 0.0

    def _default_num_blocks(self) -> int:
        cfg, shard = self.model_config, self.shard
        per_block = (2 * shard.num_layers * self.block_size * shard.num_kv_heads * cfg.head_dim
                     * self.dtype.itemsize)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return max(1, int(free * _GPU_MEMORY_FRACTION) // per_block)
        blocks_per_seq = -(-cfg.max_model_len // self.block_size)
        return max(1, min(_CPU_DEFAULT_SEQS * blocks_per_seq, _CPU_KV_BYTES // per_block))

    # -- block copies -------------------------------------------------------
    def set_host_pool(self, host_kv_buffer, num_host_blocks: int = 0) -> None:
        """Map another host pool (the KV store's shared memory). No copy may be running."""
        self.kv.set_host_buffer(host_kv_buffer, num_host_blocks)
        self.num_host_blocks = self.kv.num_host_blocks

    def copy_out(self, gpu_blocks: list[int], host_blocks: list[int]) -> CopyHandle:
        """Copy device blocks to host blocks (all layers). Async on CUDA."""
        return self.kv.copy_out(list(gpu_blocks), list(host_blocks))

    def copy_in(self, host_blocks: list[int], gpu_blocks: list[int]) -> CopyHandle:
        """Copy host blocks into device blocks. Async on CUDA; step() orders its
        device work after every copy issued before it, but a caller that
        reuses host blocks must wait for the handle first."""
        return self.kv.copy_in(list(host_blocks), list(gpu_blocks))

    # -- one iteration -------------------------------------------------------
    def validate(self, w: SeqWork) -> None:
        cfg = self.model_config
        if not w.token_ids:
            raise ValueError(f"job {w.job_id}: empty token_ids (an empty prompt cannot be run)")
        if w.num_computed < 0:
            raise ValueError(f"job {w.job_id}: num_computed={w.num_computed} < 0")
        if w.num_tokens > cfg.max_model_len:
            raise ValueError(f"job {w.job_id}: {w.num_tokens} tokens exceed the model's context "
                             f"length max_model_len={cfg.max_model_len}")
        need = -(-w.num_tokens // self.block_size)
        if len(w.block_table) < need:
            raise ValueError(f"job {w.job_id}: block_table has {len(w.block_table)} blocks, "
                             f"{need} needed for {w.num_tokens} tokens of block_size {self.block_size}")
        bad = [b for b in w.block_table[:need] if not 0 <= b < self.num_gpu_blocks]
        if bad:
            raise ValueError(f"job {w.job_id}: block ids {bad} outside [0, {self.num_gpu_blocks})")
        bad_tok = [t for t in w.token_ids if not 0 <= t < cfg.vocab_size]
        if bad_tok:
            raise ValueError(f"job {w.job_id}: token ids {bad_tok[:5]} outside the vocabulary [0, {cfg.vocab_size})")

    def _prepare(self, work: list[SeqWork], all_logits: bool,
                 every_row: frozenset[int] = frozenset()) -> tuple[StepInputs, list[int]]:
        """Pack decode jobs first, then prefills. Returns inputs and the order.
        Logit rows: the last token of each sample=True job, then every token
        of the jobs in `every_row` (indices into work), both in packing order."""
        bs, dev = self.block_size, self.device
        order = sorted(range(len(work)), key=lambda i: len(work[i].token_ids) != 1)
        tokens, positions, slots, logit_rows, extra_rows = [], [], [], [], []
        decode_tables, decode_lens, prefills = [], [], []
        for i in order:
            w = work[i]
            start = len(tokens)
            n = len(w.token_ids)
            tokens.extend(w.token_ids)
            pos = range(w.num_computed, w.num_computed + n)
            positions.extend(pos)
            slots.extend(w.block_table[p // bs] * bs + p % bs for p in pos)
            if w.sample:
                logit_rows.append(start + n - 1)
            if i in every_row:
                extra_rows.extend(range(start, start + n))
            nblocks = -(-w.num_tokens // bs)
            if n == 1:
                decode_tables.append(w.block_table[:nblocks])
                decode_lens.append(w.num_tokens)
            else:
                table = torch.tensor(w.block_table[:nblocks], device=dev) if w.num_computed else None
                prefills.append(PrefillSpan(start, n, w.num_computed, table))
        fresh = None
        starts = [p for p in prefills if p.num_computed == 0]
        longest = max((p.length for p in starts), default=0)
        if len(starts) > 1 and len(starts) * longest * longest <= _MAX_FRESH_MASK:
            prefills = [p for p in prefills if p.num_computed > 0]
            fresh = self._fresh_prefills(starts)
        pos_t = torch.tensor(positions, device=dev)
        cos = self.model.cos_table.index_select(0, pos_t).to(self.dtype)[:, None, :]
        sin = self.model.sin_table.index_select(0, pos_t).to(self.dtype)[:, None, :]
        decode_blocks = decode_mask = None
        if decode_tables:
            width = max(len(t) for t in decode_tables)
            decode_blocks = torch.tensor([b for t in decode_tables for b in t + [0] * (width - len(t))], device=dev)
            lens = torch.tensor(decode_lens, device=dev)
            decode_mask = (torch.arange(width * bs, device=dev)[None, :] < lens[:, None])[:, None, None, :]
        inp = StepInputs(
            token_ids=torch.tensor(tokens, device=dev),
            slots=torch.tensor(slots, device=dev),
            cos=cos, sin=sin,
            num_decode=len(decode_tables),
            decode_blocks=decode_blocks, decode_mask=decode_mask,
            prefills=prefills,
            fresh=fresh,
            logit_rows=None if all_logits else torch.tensor(logit_rows + extra_rows, device=dev, dtype=torch.long),
        )
        return inp, order

    def _fresh_prefills(self, spans: list[PrefillSpan]) -> FreshPrefills:
        dev = self.device
        L = max(p.length for p in spans)
        index, rows, slots, lens = [], [], [], []
        for j, p in enumerate(spans):
            index.extend(range(p.start, p.start + p.length))
            index.extend([p.start] * (L - p.length))  # padding: a real row, masked out as a key
            rows.extend(range(p.start, p.start + p.length))
            slots.extend(range(j * L, j * L + p.length))
            lens.append(p.length)
        ar = torch.arange(L, device=dev)
        causal = ar[None, :] <= ar[:, None]  # (L, L): query i sees keys <= i
        in_prompt = ar[None, :] < torch.tensor(lens, device=dev)[:, None]  # (P, L) keys
        mask = (causal[None] & in_prompt[:, None, :])[:, None]  # padded queries still see key 0: no NaN
        return FreshPrefills(torch.tensor(index, device=dev), mask, torch.tensor(rows, device=dev),
                             torch.tensor(slots, device=dev), len(spans), L)

    @torch.inference_mode()
    def forward(self, work: list[SeqWork], all_logits: bool = False,
                hidden: torch.Tensor | None = None) -> torch.Tensor | None:
        """Run the model without sampling; float32 logits of the last token of
        each sample=True job, in `work` order (all_logits: of every token, in
        `work` order, concatenated). A shard that is not the last pipeline
        stage returns its residual stream instead, rows in its own packing
        order, which the next stage passes back as `hidden` with the same
        work; a last-stage TP rank other than 0 returns None."""
        if not all_logits:
            return self._forward(work, hidden=hidden)[0]
        for w in work:
            self.validate(w)
        inp, order = self._prepare(work, True)
        self.kv.order_compute_after_copies()
        logits = self.model.forward(inp, self.kv.gpu, hidden)
        if not self.shard.last or logits is None:
            return logits
        # Undo the decode-first packing.
        starts, pos = {}, 0
        for i in order:
            starts[i] = pos
            pos += len(work[i].token_ids)
        rows = [r for i in range(len(work)) for r in range(starts[i], starts[i] + len(work[i].token_ids))]
        return logits[torch.tensor(rows, device=logits.device, dtype=torch.long)]

    def _forward(self, work: list[SeqWork], every_row: frozenset[int] = frozenset(),
                 hidden: torch.Tensor | None = None):
        """(logits of the sample=True jobs' last tokens in `work` order,
        {index in work: logits of every token of that job} for `every_row`).
        Off the last pipeline stage: (its residual stream, {}); on a last-stage
        TP rank other than 0: (None, {})."""
        for w in work:
            self.validate(w)
        inp, order = self._prepare(work, False, every_row)
        self.kv.order_compute_after_copies()
        logits = self.model.forward(inp, self.kv.gpu, hidden)
        if not self.shard.last or logits is None:
            return logits, {}
        sampled = [i for i in order if work[i].sample]
        where = {i: r for r, i in enumerate(sampled)}
        rows = [where[i] for i in range(len(work)) if work[i].sample]
        full, offset = {}, len(sampled)
        for i in order:
            if i in every_row:
                n = len(work[i].token_ids)
                full[i] = logits[offset:offset + n]
                offset += n
        return logits[torch.tensor(rows, device=logits.device, dtype=torch.long)], full

    def release(self, job_ids) -> None:
        """Forget the per-job sampling state (penalty counts, grammar
        matcher) of finished or cancelled jobs. Safe to call from another
        thread than the one running step(); takes effect at the next step."""
        self.states.release(job_ids)

    @torch.inference_mode()
    def step(self, work: list[SeqWork], hidden: torch.Tensor | None = None) -> list[SeqResult]:
        """One iteration over a mix of prefill and decode jobs; one result per
        sample=True entry, in `work` order. `hidden`: on the last stage of a
        pipeline, the residual stream the stage before computed (stage.py)."""
        if not work:
            return []
        t0 = time.perf_counter()
        check_unique(work)
        for st in self.states.take_released():
            self.sampler.release(st)
        rows, want_prompt = self._track(work)
        constrained = [i for i, r in enumerate(rows) if r.state is not None and r.state.matcher is not None]
        masks = self.grammars.start([rows[i].state for i in constrained]) if constrained else None
        logits, full = self._forward(work, want_prompt, hidden)
        for i, lg in full.items():
            self._prompt_logprobs(work[i], lg)
        results = []
        if rows:
            grammar_mask = (constrained, masks.result()) if masks is not None else None
            token_ids, logprobs, tops = self.sampler.sample(logits, rows, self.generator, grammar_mask)
            sampled = [w for w in work if w.sample]
            for w, r, t, lp, top in zip(sampled, rows, token_ids, logprobs, tops):
                prompt_lps = None
                st = r.state
                if st is not None and st.params.prompt_logprobs is not None and not st.prompt_logprobs_sent:
                    prompt_lps, st.prompt_logprobs, st.prompt_logprobs_sent = st.prompt_logprobs, [], True
                results.append(SeqResult(w.job_id, t, lp, top, prompt_lps))
        self.last_step_seconds = time.perf_counter() - t0
        return results

    def _track(self, work: list[SeqWork]) -> tuple[list[SampleRow], frozenset[int]]:
        """Feed the job states; the sample rows of the sample=True entries
        and the entries whose every logit row is needed (prompt logprobs)."""
        rows, want_prompt = [], set()
        for i, w in enumerate(work):
            st = self.states.get(w.job_id)
            if st is None and needs_state(w.sampling):
                st = self.states.get_or_create(w.job_id, w.sampling)
            if st is not None:
                st.feed(w.num_computed, w.token_ids)
                if st.params.prompt_logprobs is not None and w.num_generated == 0 and not st.prompt_logprobs_sent:
                    want_prompt.add(i)
                if w.sample and st.prompt_len is None:
                    st.prompt_len = w.num_tokens - w.num_generated
                    if st.params.grammar is not None:
                        st.matcher = self.grammars.matcher(st.params.grammar)
            if w.sample:
                rows.append(SampleRow(w.sampling, w.num_generated, st))
        return rows, frozenset(want_prompt)

    def _prompt_logprobs(self, w: SeqWork, logits: torch.Tensor) -> None:
        """Logprobs of the prompt tokens this chunk's rows predict. Row j
        predicts token j + 1; the last row of a chunk that is not the
        prompt's last predicts the next chunk's first token, kept until then."""
        st = self.states.get(w.job_id)
        if w.num_computed == 0:  # the prompt from its start (again, after its KV was dropped)
            st.prompt_logprobs, st.pending_row = [], None
        k = st.params.prompt_logprobs
        logp = logits.log_softmax(dim=-1)  # (n, V)
        preds, targets = logp[:-1], list(w.token_ids[1:])
        if st.pending_row is not None:
            preds, targets = torch.cat([st.pending_row[None], preds]), [w.token_ids[0], *targets]
        st.pending_row = None if w.sample else logp[-1]
        if not targets:
            return
        chosen = preds.gather(1, torch.tensor(targets, device=logp.device)[:, None])
        ranks = ((preds > chosen).sum(dim=-1) + 1).tolist()
        if k:
            top = preds.topk(min(k, preds.shape[-1]), dim=-1)
            tops = [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
        else:
            tops = [[] for _ in targets]
        st.prompt_logprobs.extend(zip(chosen.squeeze(1).tolist(), ranks, tops))

    @property
    def grammars(self):
        if self._grammars is None:
            from fastserve.gpu_worker.grammar import Grammars

            cfg = self.model_config
            self._grammars = Grammars(self.tokenizer.to_str(), cfg.vocab_size, cfg.eos_token_ids,
                                      overlap=self.device.type == "cuda")
        return self._grammars

    def check_prompt(self, prompt_token_ids: list[int], max_tokens: int = 1) -> None:
        """Raise ValueError when a prompt cannot be served (empty, too long)."""
        if not prompt_token_ids:
            raise ValueError("empty prompt: at least one token is needed")
        limit = self.model_config.max_model_len
        if len(prompt_token_ids) + max_tokens > limit:
            raise ValueError(f"prompt of {len(prompt_token_ids)} tokens + max_tokens={max_tokens} exceeds the "
                             f"model's context length {limit}")
