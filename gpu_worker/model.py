"""The LLaMA-family forward pass over a paged KV cache.

All jobs' new tokens are packed into one flat sequence of T tokens
(decode jobs first). Projections and MLPs run once over all T tokens;
attention runs batched over the decode jobs (their K/V gathered from blocks
into a padded tensor with a length mask) and per job for prefills. The
arithmetic follows transformers' modeling_llama so greedy outputs match it."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .loader import ModelWeights


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
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (T, nh, hd); cos/sin (T, 1, hd)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class PrefillSpan:
    start: int  # offset in the packed token sequence
    length: int
    num_computed: int  # tokens of this job already cached before this step
    block_table: torch.Tensor | None  # only when num_computed > 0


@dataclass
class StepInputs:
    """Tensors shared by all layers of one step, built once."""

    token_ids: torch.Tensor  # (T,)
    slots: torch.Tensor  # (T,) flat cache slot of each token: block * block_size + offset
    cos: torch.Tensor  # (T, 1, hd) in model dtype
    sin: torch.Tensor
    num_decode: int  # the first num_decode tokens are one-token jobs
    decode_blocks: torch.Tensor | None  # (B, max_blocks)
    decode_mask: torch.Tensor | None  # (B, 1, 1, max_blocks * block_size), True = attend
    prefills: list[PrefillSpan]
    logit_rows: torch.Tensor | None  # rows of T whose logits are wanted (None: all)


class LlamaModel:
    def __init__(self, cfg: ModelConfig, weights: ModelWeights, device, dtype: torch.dtype):
        self.cfg = cfg
        self.w = weights
        self.device = torch.device(device)
        self.dtype = dtype
        self.cos_table, self.sin_table = rope_tables(cfg, self.device)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim

    def forward(self, inp: StepInputs, kv: torch.Tensor) -> torch.Tensor:
        """kv: (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim).
        Writes this step's K/V into kv and returns float32 logits."""
        cfg, w = self.cfg, self.w
        x = F.embedding(inp.token_ids, w.embed)
        for i, lw in enumerate(w.layers):
            residual = x
            h = rms_norm(x, lw.in_norm, cfg.rms_norm_eps)
            h = self._attention(h, lw, inp, kv[i, 0], kv[i, 1])
            x = residual + h
            residual = x
            h = rms_norm(x, lw.post_norm, cfg.rms_norm_eps)
            gate_up = F.linear(h, lw.gate_up_w)
            gate, up = gate_up.split(cfg.intermediate_size, dim=-1)
            x = residual + F.linear(F.silu(gate) * up, lw.down_w)
        if inp.logit_rows is not None:
            x = x.index_select(0, inp.logit_rows)
        x = rms_norm(x, w.norm, cfg.rms_norm_eps)
        return F.linear(x, w.lm_head).float()

    def _attention(self, h, lw, inp: StepInputs, k_cache, v_cache):
        cfg = self.cfg
        T = h.shape[0]
        nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv = F.linear(h, lw.qkv_w, lw.qkv_b)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rope(q.view(T, nh, hd), inp.cos, inp.sin)
        k = apply_rope(k.view(T, nkv, hd), inp.cos, inp.sin)
        v = v.view(T, nkv, hd)
        nb, bs = k_cache.shape[0], k_cache.shape[1]
        k_cache.view(nb * bs, nkv, hd).index_copy_(0, inp.slots, k)
        v_cache.view(nb * bs, nkv, hd).index_copy_(0, inp.slots, v)

        out = torch.empty(T, nh, hd, dtype=h.dtype, device=h.device)
        B = inp.num_decode
        if B:
            # One query per job: fold the query heads that share a KV head into
            # the query-length axis, so GQA needs no repeat of K/V.
            kd = k_cache[inp.decode_blocks].view(B, -1, nkv, hd).transpose(1, 2)  # (B, nkv, S, hd)
            vd = v_cache[inp.decode_blocks].view(B, -1, nkv, hd).transpose(1, 2)
            qd = q[:B].view(B, nkv, nh // nkv, hd)
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=inp.decode_mask, scale=self.scale)
            out[:B] = od.reshape(B, nh, hd)
        for span in inp.prefills:
            a, n = span.start, span.length
            qp = q[a:a + n].transpose(0, 1)[None]  # (1, nh, n, hd)
            if span.num_computed == 0:
                kp = k[a:a + n].transpose(0, 1)[None]
                vp = v[a:a + n].transpose(0, 1)[None]
                op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=self.scale, enable_gqa=True)
            else:
                total = span.num_computed + n
                kp = k_cache[span.block_table].view(-1, nkv, hd)[:total].transpose(0, 1)[None]
                vp = v_cache[span.block_table].view(-1, nkv, hd)[:total].transpose(0, 1)[None]
                qpos = torch.arange(span.num_computed, total, device=h.device)
                mask = torch.arange(total, device=h.device)[None, :] <= qpos[:, None]
                op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=self.scale, enable_gqa=True)
            out[a:a + n] = op[0].transpose(0, 1)
        o = F.linear(out.view(T, nh * hd), lw.o_w, lw.o_b)
        return o
