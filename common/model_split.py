"""How one model replica is split over P pipeline stages x T tensor-parallel
ranks: the layers of each stage (balanced by parameter count, or an explicit
split), the heads, MLP columns and vocabulary rows of each TP rank, and where
each rank's KV lives inside a host block.

Pure arithmetic on ModelConfig: the workers load their part with it and the
KV store sizes the host pool with it.

Ranks are numbered stage-major: rank = stage * T + tp_rank; rank 0 (stage 0,
TP rank 0) is the leader. A host block holds one chunk per rank, in rank
order, each laid out like a single worker's block (layers, 2, block_size,
kv_heads, head_dim): with T <= num_kv_heads the chunks of all ranks add up to
exactly the bytes of an unsplit model's block.
"""
from __future__ import annotations

from dataclasses import dataclass

from fastserve.common.model_config import ModelConfig

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class RankShard:
    """The part of the model one rank holds. Ranges index the unsplit model:
    query heads, KV heads, MLP intermediate columns and vocabulary rows
    (the vocabulary range is padded to an equal share per rank, so it may
    run past vocab_size: those rows are zeros)."""

    stage: int
    tp_rank: int
    tp_size: int
    layers: range
    first: bool  # embeds the tokens
    last: bool  # norms, projects to the vocabulary and samples
    q_heads: range
    kv_heads: range
    intermediate: range
    vocab: range
    vocab_size: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_heads(self) -> int:
        return len(self.q_heads)

    @property
    def num_kv_heads(self) -> int:
        return len(self.kv_heads)


def _layer_params(cfg: ModelConfig) -> int:
    h, hd = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if cfg.qkv_bias else 0) + (h if cfg.o_bias else 0)
    return attn + 3 * h * cfg.intermediate_size + 2 * h


def balanced_layer_split(cfg: ModelConfig, num_stages: int) -> tuple[int, ...]:
    """Layers per stage minimising the largest stage's parameter count; the
    embedding counts on stage 0, the final norm and the vocabulary projection
    on the last stage (a tied projection is a copy there)."""
    n, layer = cfg.num_layers, _layer_params(cfg)
    extra = [0] * num_stages
    extra[0] += cfg.vocab_size * cfg.hidden_size
    extra[-1] += cfg.vocab_size * cfg.hidden_size + cfg.hidden_size
    inf = float("inf")
    # best[k][m]: the smallest possible largest stage when stages 0..k-1 hold m layers.
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    choice = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0
    for k in range(1, num_stages + 1):
        for m in range(k, n + 1):
            for size in range(1, m - (k - 1) + 1):
                cost = max(best[k - 1][m - size], size * layer + extra[k - 1])
                if cost < best[k][m]:
                    best[k][m], choice[k][m] = cost, size
    sizes, m = [], n
    for k in range(num_stages, 0, -1):
        sizes.append(choice[k][m])
        m -= choice[k][m]
    return tuple(reversed(sizes))


class ModelSplit:
    def __init__(self, config: ModelConfig, pipeline_parallel_size: int = 1, tensor_parallel_size: int = 1,
                 layer_split: tuple[int, ...] | list[int] | None = None):
        cfg, P, T = config, pipeline_parallel_size, tensor_parallel_size
        if P < 1 or T < 1:
            raise ValueError(f"pipeline and tensor parallel sizes must be >= 1, got {P} and {T}")
        if P > cfg.num_layers:
            raise ValueError(f"{P} pipeline stages but the model has only {cfg.num_layers} layers")
        if cfg.num_heads % T:
            raise ValueError(f"tensor_parallel_size={T} does not divide num_attention_heads={cfg.num_heads}")
        if cfg.num_kv_heads % T and T % cfg.num_kv_heads:
            raise ValueError(f"tensor_parallel_size={T} neither divides nor is a multiple of "
                             f"num_key_value_heads={cfg.num_kv_heads}")
        if cfg.intermediate_size % T:
            raise ValueError(f"tensor_parallel_size={T} does not divide intermediate_size={cfg.intermediate_size}")
        if layer_split is None:
            layer_split = balanced_layer_split(cfg, P)
        layer_split = tuple(int(n) for n in layer_split)
        if len(layer_split) != P or min(layer_split) < 1 or sum(layer_split) != cfg.num_layers:
            raise ValueError(f"layer split {list(layer_split)} must give each of the {P} stages at least one "
                             f"layer and {cfg.num_layers} layers in all")
        self.config = cfg
        self.pipeline_parallel_size = P
        self.tensor_parallel_size = T
        self.layer_split = layer_split

    @property
    def world_size(self) -> int:
        return self.pipeline_parallel_size * self.tensor_parallel_size

    def rank(self, stage: int, tp_rank: int) -> int:
        return stage * self.tensor_parallel_size + tp_rank

    def coords(self, rank: int) -> tuple[int, int]:
        """(stage, tp_rank) of a rank."""
        return divmod(rank, self.tensor_parallel_size)

    def stage_layers(self, stage: int) -> range:
        start = sum(self.layer_split[:stage])
        return range(start, start + self.layer_split[stage])

    @property
    def kv_heads_per_rank(self) -> int:
        """KV heads each TP rank holds: a share, or one replica of the head its
        query heads read when T exceeds the model's KV heads."""
        return max(self.config.num_kv_heads // self.tensor_parallel_size, 1)

    def shard(self, stage: int, tp_rank: int) -> RankShard:
        cfg, T = self.config, self.tensor_parallel_size
        if not (0 <= stage < self.pipeline_parallel_size and 0 <= tp_rank < T):
            raise ValueError(f"no rank (stage {stage}, tp_rank {tp_rank}) in a {self.pipeline_parallel_size}x{T} split")
        nh = cfg.num_heads // T
        nkv = self.kv_heads_per_rank
        # Query head h reads KV head h // (num_heads / num_kv_heads).
        kv0 = (tp_rank * nh) // (cfg.num_heads // cfg.num_kv_heads)
        inter = cfg.intermediate_size // T
        vocab = -(-cfg.vocab_size // T)
        return RankShard(stage=stage, tp_rank=tp_rank, tp_size=T, layers=self.stage_layers(stage),
                         first=stage == 0, last=stage == self.pipeline_parallel_size - 1,
                         q_heads=range(tp_rank * nh, (tp_rank + 1) * nh), kv_heads=range(kv0, kv0 + nkv),
                         intermediate=range(tp_rank * inter, (tp_rank + 1) * inter),
                         vocab=range(tp_rank * vocab, (tp_rank + 1) * vocab), vocab_size=cfg.vocab_size)

    def _chunk_bytes(self, stage: int, block_size: int, dtype: str) -> int:
        cfg = self.config
        return (self.layer_split[stage] * 2 * block_size * self.kv_heads_per_rank * cfg.head_dim
                * DTYPE_BYTES[dtype])

    def kv_bytes_per_block(self, block_size: int, dtype: str = "float32") -> int:
        """Bytes of one host block: the chunks of every rank."""
        return sum(self._chunk_bytes(s, block_size, dtype)
                   for s in range(self.pipeline_parallel_size)) * self.tensor_parallel_size

    def host_chunk(self, stage: int, tp_rank: int, block_size: int, dtype: str = "float32") -> tuple[int, int]:
        """(offset, bytes) of one rank's chunk inside every host block."""
        before = sum(self._chunk_bytes(s, block_size, dtype) for s in range(stage)) * self.tensor_parallel_size
        size = self._chunk_bytes(stage, block_size, dtype)
        return before + tp_rank * size, size
