"""The arithmetic of splitting a model over pipeline stages and tensor-parallel
ranks (no torch, no processes)."""
import itertools

import pytest

from fastserve.common.host_pool import kv_bytes_per_block
from fastserve.common.model_config import ModelConfig
from fastserve.common.model_split import ModelSplit, _layer_params, balanced_layer_split
from fastserve.gpu_worker.model_maker import model_config


def config(preset="small", **overrides) -> ModelConfig:
    vocab = overrides.pop("vocab_size", 4096 if preset == "small" else 1024)
    return ModelConfig.from_dict(model_config("llama", preset, vocab, **overrides))


def _stage_costs(cfg, sizes):
    layer, vocab = _layer_params(cfg), cfg.vocab_size * cfg.hidden_size
    costs = [n * layer for n in sizes]
    costs[0] += vocab
    costs[-1] += vocab + cfg.hidden_size
    return costs


@pytest.mark.parametrize("layers,stages", [(8, 2), (8, 3), (7, 4), (5, 5), (12, 3)])
def test_balanced_split_minimises_the_largest_stage(layers, stages):
    cfg = config(num_hidden_layers=layers)
    sizes = balanced_layer_split(cfg, stages)
    assert len(sizes) == stages and min(sizes) >= 1 and sum(sizes) == layers
    every = [c for c in itertools.product(range(1, layers + 1), repeat=stages) if sum(c) == layers]
    assert max(_stage_costs(cfg, sizes)) == min(max(_stage_costs(cfg, c)) for c in every)


def test_balanced_split_of_the_small_model():
    cfg = config()
    assert balanced_layer_split(cfg, 2) == (4, 4)
    # The final norm makes the last stage 512 parameters heavier than the first.
    assert balanced_layer_split(cfg, 3) == (3, 3, 2)
    # A big vocabulary pushes layers away from the ends.
    assert balanced_layer_split(config(vocab_size=200_000, num_hidden_layers=12), 3)[1] > 4


def test_explicit_layer_split_and_invalid_splits():
    cfg = config()
    split = ModelSplit(cfg, 2, 1, layer_split=[3, 5])
    assert (split.stage_layers(0), split.stage_layers(1)) == (range(0, 3), range(3, 8))
    for bad in ([4, 3], [0, 8], [2, 2, 4]):
        with pytest.raises(ValueError, match="layer split"):
            ModelSplit(cfg, 2, 1, layer_split=bad)
    with pytest.raises(ValueError, match="only 8 layers"):
        ModelSplit(cfg, 9, 1)
    with pytest.raises(ValueError, match="num_attention_heads"):
        ModelSplit(cfg, 1, 3)
    with pytest.raises(ValueError, match="intermediate_size"):
        ModelSplit(config(intermediate_size=1004), 1, 8)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelSplit(config(num_attention_heads=12, num_key_value_heads=4), 1, 6)


def test_heads_columns_and_vocabulary_per_tp_rank():
    cfg = config("tiny")  # 4 query heads, 2 KV heads, intermediate 384, vocabulary 1024
    two = ModelSplit(cfg, 1, 2)
    assert [(s.q_heads, s.kv_heads) for s in (two.shard(0, 0), two.shard(0, 1))] == [
        (range(0, 2), range(0, 1)), (range(2, 4), range(1, 2))]
    four = ModelSplit(cfg, 1, 4)  # more ranks than KV heads: each holds the one its queries read
    assert [four.shard(0, r).kv_heads for r in range(4)] == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    assert [four.shard(0, r).intermediate for r in range(4)][-1] == range(288, 384)
    odd = ModelSplit(config("tiny", vocab_size=1001), 2, 2)
    assert odd.shard(1, 1).vocab == range(501, 1002)  # padded to equal shares
    assert (odd.shard(0, 0).first, odd.shard(0, 0).last, odd.shard(1, 0).last) == (True, False, True)
    assert [odd.coords(r) for r in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]


@pytest.mark.parametrize("P,T", [(1, 1), (2, 1), (2, 2), (3, 1), (1, 4), (2, 4)])
def test_host_chunks_tile_a_block(P, T):
    cfg = config("tiny", num_hidden_layers=6)
    split = ModelSplit(cfg, P, T)
    chunks = sorted(split.host_chunk(*split.coords(r), 16) for r in range(split.world_size))
    assert chunks[0][0] == 0
    assert all(a[0] + a[1] == b[0] for a, b in zip(chunks, chunks[1:]))  # adjacent, no overlap
    total = chunks[-1][0] + chunks[-1][1]
    assert total == split.kv_bytes_per_block(16)
    unsplit = 2 * cfg.num_layers * 16 * cfg.num_kv_heads * cfg.head_dim * 4
    # Only replicas (T above the 2 KV heads) take more room than one worker's block.
    assert total == unsplit * max(1, T // cfg.num_kv_heads)


def test_kv_store_sizes_the_pool_of_a_split_replica(tiny_model_dir):
    one = kv_bytes_per_block(tiny_model_dir, 16)
    assert kv_bytes_per_block(tiny_model_dir, 16, tensor_parallel_size=2) == one
    assert kv_bytes_per_block(tiny_model_dir, 16, tensor_parallel_size=4) == 2 * one
    assert kv_bytes_per_block(tiny_model_dir, 16, "bfloat16") == one // 2
