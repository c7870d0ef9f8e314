"""The LLaMA-family forward pass over a paged KV cache.

All jobs' new tokens are packed into one flat sequence of T tokens
(decode jobs first). Projections and MLPs run once over all T tokens;
attention runs batched over the decode jobs (their K/V gathered from blocks
into a padded tensor with a length mask); prompts that start at position 0 are
padded into one causal batch, prompt chunks that continue a cached prefix
attend one job at a time. The
arithmetic follows transformers' modeling_llama so greedy outputs match it.

A model may be one rank's shard (common/model_split.py): a pipeline stage
runs its layers only, starting from the previous stage's residual stream
unless it embeds, and ending there unless it is last; a tensor-parallel rank
holds its heads and MLP columns and reduces with its peers (tp_comm.py)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastserve.common.model_config import ModelConfig
from fastserve.common.model_split import ModelSplit, RankShard
from fastserve.gpu_worker.loader import ModelWeights
from fastserve.gpu_worker.tp_comm import TPComm


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_tables(cfg: ModelConfig, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for every position, float32, (max_model_len, head_dim)."""
    pos = torch.arange(cfg.max_model_len, dtype=torch.float32)
    freqs = pos[:, None] * rope_inv_freq(cfg)[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(device), emb.sin().to(device)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        # One fused kernel; the same arithmetic as the float32 path below.
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (T, nh, hd); cos/sin (T, 1, hd)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Linear:
    """y = x W^T + b. On the CPU the weight is prepacked once for oneDNN,
    whose small-batch GEMMs are several times faster than the default MKL
    path that F.linear takes (decode runs at batch 1-32: that is the case
    that matters)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, prepack: bool):
        self.bias = bias
        self.packed = None
        if prepack:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
            self.weight = None  # the packed copy replaces it
        else:
            self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def can_prepack(device: torch.device, dtype: torch.dtype) -> bool:
    if not (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    if dtype == torch.bfloat16:
        # oneDNN's packed bf16 GEMM needs AVX-512 (bw/vl/dq) or AVX-NE-CONVERT;
        # without them (AMD EPYC before Zen 4, most desktop CPUs) it raises at
        # pack time. F.linear's bf16 path works on every x86-64 CPU, slower.
        supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(supported is not None and supported())
    return True


@dataclass
class LayerLinears:
    qkv: Linear
    o: Linear
    gate_up: Linear
    down: Linear


@dataclass
class PrefillSpan:
    start: int  # offset in the packed token sequence
    length: int
    num_computed: int  # tokens of this job already cached before this step
    block_table: torch.Tensor | None  # only when num_computed > 0


@dataclass
class FreshPrefills:
    """Prompts starting at position 0, padded to one (P, L) batch so their
    attention is one call rather than one per job."""

    index: torch.Tensor  # (P * L,) packed-token row of each padded slot (padding: any row)
    mask: torch.Tensor  # (P, 1, L, L) causal and within the prompt
    rows: torch.Tensor  # packed-token rows of the real slots...
    slots: torch.Tensor  # ...and their positions in the padded (P * L) batch
    num: int
    length: int


@dataclass
class StepInputs:
    """Tensors shared by all layers of one step, built once."""

    token_ids: torch.Tensor  # (T,)
    slots: torch.Tensor  # (T,) flat cache slot of each token: block * block_size + offset
    cos: torch.Tensor  # (T, 1, hd) in model dtype
    sin: torch.Tensor
    num_decode: int  # the first num_decode tokens are one-token jobs
    decode_blocks: torch.Tensor | None  # (B * max_blocks,) block ids, each job's row padded
    decode_mask: torch.Tensor | None  # (B, 1, 1, max_blocks * block_size), True = attend
    prefills: list[PrefillSpan]  # attended one by one
    fresh: FreshPrefills | None  # attended together
    logit_rows: torch.Tensor | None  # rows of T whose logits are wanted (None: all)


class LlamaModel:
    def __init__(self, cfg: ModelConfig, weights: ModelWeights, device, dtype: torch.dtype, prepack: bool = True,
                 shard: RankShard | None = None, tp: TPComm | None = None):
        self.cfg = cfg
        self.w = weights
        self.device = torch.device(device)
        self.dtype = dtype
        self.shard = shard = shard or ModelSplit(cfg).shard(0, 0)
        self.tp = tp or TPComm()
        pack = prepack and can_prepack(self.device, dtype)
        # A row-parallel projection's bias is added once, after the reduction.
        split = shard.tp_size > 1
        self.linears = [LayerLinears(Linear(lw.qkv_w, lw.qkv_b, pack), Linear(lw.o_w, None if split else lw.o_b, pack),
                                     Linear(lw.gate_up_w, None, pack), Linear(lw.down_w, None, pack))
                        for lw in weights.layers]
        self.o_bias = [lw.o_b if split else None for lw in weights.layers]
        self.lm_head = Linear(weights.lm_head, None, pack) if shard.last else None
        if pack:  # drop the unpacked copies; the embedding table stays for lookups
            for lw in weights.layers:
                lw.qkv_w = lw.o_w = lw.gate_up_w = lw.down_w = None
            weights.lm_head = None
        self.cos_table, self.sin_table = rope_tables(cfg, self.device)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.num_heads, self.num_kv_heads = shard.num_heads, shard.num_kv_heads
        self.intermediate = len(shard.intermediate)
        self.q_size = self.num_heads * cfg.head_dim
        self.kv_size = self.num_kv_heads * cfg.head_dim

    def tensors(self) -> list[torch.Tensor]:
        """Every weight tensor this rank holds (packed ones included)."""
        held = [self.w.embed, self.w.norm, self.w.lm_head]
        for lw in self.w.layers:
            held += [lw.in_norm, lw.post_norm, lw.qkv_w, lw.o_w, lw.gate_up_w, lw.down_w]
        linears = [x for lin in self.linears for x in (lin.qkv, lin.o, lin.gate_up, lin.down)]
        for lin in linears + ([self.lm_head] if self.lm_head is not None else []):
            held += [lin.packed, lin.weight, lin.bias]
        held += self.o_bias
        unique = {id(t): t for t in held if t is not None}
        return list(unique.values())

    def forward(self, inp: StepInputs, kv: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor | None:
        """kv: (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
        of this shard. Writes this step's K/V into kv. The first stage embeds
        inp.token_ids, a later one continues from `hidden`, the previous
        stage's (T, hidden_size) residual stream; a stage that is not last
        returns its residual stream, the last one float32 logits (on TP rank 0;
        None on the other TP ranks)."""
        cfg, w = self.cfg, self.w
        x = self.tp.embed(inp.token_ids, w.embed, self.shard.vocab) if self.shard.first else hidden
        for i, (lw, lin, o_bias) in enumerate(zip(w.layers, self.linears, self.o_bias)):
            residual = x
            h = rms_norm(x, lw.in_norm, cfg.rms_norm_eps)
            h = self.tp.all_reduce(self._attention(h, lin, inp, kv[i]))
            if o_bias is not None:
                h = h + o_bias
            x = residual + h
            residual = x
            h = rms_norm(x, lw.post_norm, cfg.rms_norm_eps)
            gate, up = lin.gate_up(h).split(self.intermediate, dim=-1)
            x = residual + self.tp.all_reduce(lin.down(F.silu(gate) * up))
        if not self.shard.last:
            return x
        if inp.logit_rows is not None:
            x = x.index_select(0, inp.logit_rows)
        x = rms_norm(x, w.norm, cfg.rms_norm_eps)
        return self.tp.gather_logits(self.lm_head(x).float(), cfg.vocab_size)

    def _attention(self, h, lin: LayerLinears, inp: StepInputs, kv: torch.Tensor):
        """kv: this layer's (2, num_blocks, block_size, num_kv_heads, head_dim)."""
        T = h.shape[0]
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.cfg.head_dim
        qkv = lin.qkv(h)
        # RoPE on the query and key heads together: half the small ops.
        qk = apply_rope(qkv[:, :self.q_size + self.kv_size].view(T, nh + nkv, hd), inp.cos, inp.sin)
        q, k = qk[:, :nh], qk[:, nh:]
        v = qkv[:, self.q_size + self.kv_size:].view(T, nkv, hd)
        nb, bs = kv.shape[1], kv.shape[2]
        kv[0].view(nb * bs, nkv, hd).index_copy_(0, inp.slots, k)
        kv[1].view(nb * bs, nkv, hd).index_copy_(0, inp.slots, v)
        blocks = kv.view(2, nb, bs * nkv * hd)  # index_select of whole blocks is a plain row copy

        out = torch.empty(T, nh, hd, dtype=h.dtype, device=h.device)
        B = inp.num_decode
        if B:
            # One query per job: fold the query heads that share a KV head into
            # the query-length axis, so GQA needs no repeat of K/V.
            kvd = blocks.index_select(1, inp.decode_blocks).view(2, B, -1, nkv, hd).transpose(2, 3)
            kd, vd = kvd[0], kvd[1]  # (B, nkv, S, hd)
            qd = q[:B].view(B, nkv, nh // nkv, hd)
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=inp.decode_mask, scale=self.scale)
            out[:B] = od.reshape(B, nh, hd)
        if inp.fresh is not None:
            f = inp.fresh
            P, L = f.num, f.length
            qf = q.index_select(0, f.index).view(P, L, nh, hd).transpose(1, 2)
            kf = k.index_select(0, f.index).view(P, L, nkv, hd).transpose(1, 2)
            vf = v.index_select(0, f.index).view(P, L, nkv, hd).transpose(1, 2)
            of = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=f.mask, scale=self.scale, enable_gqa=True)
            of = of.transpose(1, 2).reshape(P * L, nh, hd)
            out.index_copy_(0, f.rows, of.index_select(0, f.slots))
        for span in inp.prefills:
            a, n = span.start, span.length
            qp = q[a:a + n].transpose(0, 1)[None]  # (1, nh, n, hd)
            if span.num_computed == 0:
                kp = k[a:a + n].transpose(0, 1)[None]
                vp = v[a:a + n].transpose(0, 1)[None]
                op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=self.scale, enable_gqa=True)
            else:
                total = span.num_computed + n
                kvp = blocks.index_select(1, span.block_table).view(2, -1, nkv, hd)[:, :total].transpose(1, 2)
                kp, vp = kvp[0][None], kvp[1][None]  # (1, nkv, total, hd)
                qpos = torch.arange(span.num_computed, total, device=h.device)
                mask = torch.arange(total, device=h.device)[None, :] <= qpos[:, None]
                op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=self.scale, enable_gqa=True)
            out[a:a + n] = op[0].transpose(0, 1)
        return lin.o(out.view(T, nh * hd))
