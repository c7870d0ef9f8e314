"""A replica split over pipeline stages and tensor-parallel ranks (gloo, one
process per rank) serves exactly like the single Engine: the same greedy
tokens through mixed prefill/decode batches, jobs in consecutive in-flight
batches, and an offload/overwrite/upload between iterations; each rank holds
only its share of the weights and writes its chunk of the shared host pool."""
import math

import pytest
import torch
from safetensors import safe_open

from fastserve.common.host_pool import HostKVPool, PoolSpec
from fastserve.common.model_config import ModelConfig
from fastserve.common.model_split import ModelSplit
from fastserve.gpu_worker.batch import PENDING_TOKEN, SeqWork
from fastserve.gpu_worker.engine import Engine
from fastserve.gpu_worker.launch import launch_rank, spawn_local
from pipeline_scenarios import (GREEDY, NUM_GPU_BLOCKS, NUM_HOST_BLOCKS, SWAP_HOST_BLOCKS, EngineAsLeader,
                                run_scenario, scenario_prompts, scenario_rank, vanishing_stage_rank)

FAMILIES = {
    "llama": ("llama", 0, {}),
    "qwen2": ("qwen2", 0, {}),  # q/k/v biases, tied embeddings
    "mistral": ("mistral", 1, {}),  # seed 1: with llama's weights it would give llama's tokens
    "llama-mqa": ("llama", 0, {"num_key_value_heads": 1}),  # T=2 replicates the one KV head
}
SPLITS = {"P2": (2, 1), "T2": (1, 2), "P2xT2": (2, 2)}


@pytest.fixture(scope="module")
def models(make_tiny_model):
    return {name: make_tiny_model(arch, seed, **overrides) for name, (arch, seed, overrides) in FAMILIES.items()}


@pytest.fixture(scope="module")
def references(models):
    """The single Engine through the same scenario: tokens and the offloaded host blocks."""
    out = {}
    for name, path in models.items():
        engine = Engine(path, num_gpu_blocks=NUM_GPU_BLOCKS, num_host_blocks=NUM_HOST_BLOCKS)
        d = run_scenario(EngineAsLeader(engine), scenario_prompts(engine.tokenizer))
        out[name] = {"tokens": d.tokens, "logprobs": d.logprobs, "host": engine.kv.host[SWAP_HOST_BLOCKS].clone()}
        # Control: without the swap, j1 continues on blocks j4 overwrote and
        # its output changes, so the equality of the swapped runs is earned.
        clobbered = run_scenario(EngineAsLeader(Engine(path, num_gpu_blocks=NUM_GPU_BLOCKS)),
                                 scenario_prompts(engine.tokenizer), swap=False)
        assert not _close(clobbered.logprobs["j1"], d.logprobs["j1"]), name
    distinct = {tuple(t) for o in out.values() for t in o["tokens"].values()}
    assert len(distinct) == sum(len(o["tokens"]) for o in out.values())  # no two jobs or models alike
    return out


def _close(a, b, tol=1e-4) -> bool:
    return len(a) == len(b) and torch.allclose(torch.tensor(a), torch.tensor(b), atol=tol, rtol=tol)


def _checkpoint_shapes(path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def _expected_params(path, split: ModelSplit, stage: int, tp_rank: int) -> int:
    """What one rank should hold, from the checkpoint's tensor shapes."""
    cfg, T = split.config, split.tensor_parallel_size
    shard = split.shard(stage, tp_rank)
    shapes = _checkpoint_shapes(path)

    def share(name: str) -> int:
        n = math.prod(shapes[name])
        if "norm" in name or name.endswith("o_proj.bias"):
            return n  # replicated
        if "k_proj" in name or "v_proj" in name:
            return n * shard.num_kv_heads // cfg.num_kv_heads
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return -(-cfg.vocab_size // T) * cfg.hidden_size
        return n // T

    total = sum(share(n) for n in shapes if n.startswith("model.layers.")
                and int(n.split(".")[2]) in shard.layers)
    if shard.first:
        total += share("model.embed_tokens.weight")
    if shard.last:
        total += share("model.norm.weight") + share("model.embed_tokens.weight")  # the projection
    return total


def _reassemble(pool: torch.Tensor, split: ModelSplit, blocks: list[int]) -> torch.Tensor:
    """Host blocks of a split replica, rank chunks put back into the
    (blocks, layers, 2, block_size, kv_heads, head_dim) layout of one Engine.
    Where TP ranks hold replicas of a KV head, the replicas must be the same
    bits: the ranks' residual streams never drift apart."""
    cfg = split.config
    rows = pool.view(-1, split.kv_bytes_per_block(16))[blocks]
    full = torch.zeros(len(blocks), cfg.num_layers, 2, 16, cfg.num_kv_heads, cfg.head_dim)
    seen = {}
    for rank in range(split.world_size):
        stage, tp_rank = split.coords(rank)
        shard = split.shard(stage, tp_rank)
        offset, size = split.host_chunk(stage, tp_rank, 16)
        chunk = rows[:, offset:offset + size].contiguous().view(torch.float32)
        chunk = chunk.view(len(blocks), shard.num_layers, 2, 16, shard.num_kv_heads, cfg.head_dim)
        replica = seen.setdefault((stage, shard.kv_heads.start), chunk)
        assert torch.equal(replica, chunk), (stage, tp_rank)
        full[:, shard.layers.start:shard.layers.stop, :, :, shard.kv_heads.start:shard.kv_heads.stop] = chunk
    return full


@pytest.mark.parametrize("config", SPLITS)
def test_split_replica_serves_like_one_engine(config, models, references, tmp_path):
    P, T = SPLITS[config]
    splits = {name: ModelSplit(ModelConfig.from_model_dir(path), P, T) for name, path in models.items()}
    pools = {}
    for name in models:
        spec = PoolSpec(str(tmp_path / f"{name}.kv"), NUM_HOST_BLOCKS, splits[name].kv_bytes_per_block(16))
        pools[name] = HostKVPool.create(spec)
    ranks = spawn_local(scenario_rank, P, T, ({n: str(p) for n, p in models.items()},
                                             {n: (p.spec.path, p.spec.num_blocks, p.spec.bytes_per_block) for n, p in pools.items()}), timeout=240)
    for name, path in models.items():
        split, leader = splits[name], ranks[0][name]
        assert leader["tokens"] == references[name]["tokens"], name
        for job, lps in references[name]["logprobs"].items():
            assert _close(leader["logprobs"][job], lps), (name, job)
        assert leader["pending_fed"] > 0  # jobs really ran in consecutive in-flight batches
        # Two stages work on two batches at once; one stage finishes a batch before it starts the next.
        assert leader["overlap"] == (P > 1)
        if P > 1:
            assert all(len(s) == P and min(s) > 0 for s in leader["stage_seconds"])

        full = sum(math.prod(s) for s in _checkpoint_shapes(path).values())
        for rank, row in enumerate(ranks):
            stage, tp_rank = split.coords(rank)
            assert row[name]["layers"] == list(split.stage_layers(stage))
            assert row[name]["params"] == _expected_params(path, split, stage, tp_rank), (name, rank)
            assert row[name]["params"] < 0.7 * full, (name, rank)

        host = _reassemble(pools[name].tensor, split, SWAP_HOST_BLOCKS)
        reference = references[name]["host"]
        assert reference.abs().sum() > 0
        if T == 1:  # the same arithmetic, layer by layer: the same bits
            assert torch.equal(host, reference), name
        else:  # row-parallel sums round differently in the last bits
            torch.testing.assert_close(host, reference, atol=1e-4, rtol=1e-4)
        pools[name].close()


def test_one_rank_leader_in_process(tiny_model_dir):
    """P = T = 1 needs no process group: the leader's API over one Engine,
    and the checks it makes before anything enters the pipeline."""
    leader = launch_rank(tiny_model_dir, num_gpu_blocks=NUM_GPU_BLOCKS, num_host_blocks=NUM_HOST_BLOCKS)
    try:
        reference = Engine(tiny_model_dir, num_gpu_blocks=NUM_GPU_BLOCKS, num_host_blocks=NUM_HOST_BLOCKS)
        prompts = scenario_prompts(reference.tokenizer)
        expected = run_scenario(EngineAsLeader(reference), prompts).tokens
        assert run_scenario(leader, prompts).tokens == expected
        with pytest.raises(ValueError, match=r"\[PENDING_TOKEN\] needs an earlier batch"):
            leader.submit([SeqWork("new", [PENDING_TOKEN], 3, [0], GREEDY)])
        with pytest.raises(ValueError, match="outside"):
            leader.submit([SeqWork("x", [5, 6], 0, [NUM_GPU_BLOCKS], GREEDY)])
        with pytest.raises(ValueError, match="host block id"):
            leader.copy_out([0], [NUM_HOST_BLOCKS])
        assert leader.in_flight == 0
    finally:
        leader.close()
    with pytest.raises(RuntimeError, match="closed"):
        leader.submit([SeqWork("y", [5], 0, [0], GREEDY)])


def test_a_vanished_stage_fails_the_batch_instead_of_hanging(tiny_model_dir):
    ranks = spawn_local(vanishing_stage_rank, 2, 1, (str(tiny_model_dir),), timeout=60)
    assert ranks == ["refused", "left"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("config", ["P2", "P2xT2"])
def test_split_replica_on_cuda(config, models, tmp_path):
    """The scenario on GPUs: NCCL where there is a GPU per rank, else every
    rank on one GPU over gloo with activations staged through host memory
    (NCCL refuses two ranks on one device)."""
    P, T = SPLITS[config]
    backend = None if torch.cuda.device_count() >= P * T else "gloo"
    models = {name: models[name] for name in ("llama", "qwen2")}
    pools = {}
    for name, path in models.items():
        split = ModelSplit(ModelConfig.from_model_dir(path), P, T)
        pools[name] = HostKVPool.create(PoolSpec(str(tmp_path / f"{name}.kv"), NUM_HOST_BLOCKS,
                                                 split.kv_bytes_per_block(16)))
    ranks = spawn_local(scenario_rank, P, T, ({n: str(p) for n, p in models.items()},
                                             {n: (p.spec.path, p.spec.num_blocks, p.spec.bytes_per_block) for n, p in pools.items()}),
                        timeout=300, device="cuda", backend=backend)
    for name, path in models.items():
        engine = Engine(path, device="cuda", num_gpu_blocks=NUM_GPU_BLOCKS, num_host_blocks=NUM_HOST_BLOCKS)
        expected = run_scenario(EngineAsLeader(engine), scenario_prompts(engine.tokenizer))
        assert ranks[0][name]["tokens"] == expected.tokens, name
        for job, lps in expected.logprobs.items():
            assert _close(ranks[0][name]["logprobs"][job], lps), (name, job)
        pools[name].close()
