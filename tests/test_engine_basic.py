"""Engine basics: the model maker's files, one step of mixed work, bad input."""
import json

import pytest

from fastserve.gpu_worker.batch import SeqWork
from fastserve.common.model_config import UnsupportedModelError
from fastserve.gpu_worker.engine import Engine
from fastserve.common.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine(tiny_model_dir, num_gpu_blocks=64)


def test_make_model_writes_a_checkpoint(tiny_model_dir):
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]  # GQA


def test_engine_exposes_its_shape(engine):
    cfg = engine.model_config
    assert cfg.num_layers == 2 and cfg.num_kv_heads == 2 and cfg.head_dim == 32
    assert cfg.vocab_size == engine.tokenizer.get_vocab_size()
    assert engine.bytes_per_block == 2 * cfg.num_layers * 16 * cfg.num_kv_heads * cfg.head_dim * 4
    assert cfg.eos_token_ids == (1, 3)


def test_step_mixes_prefill_and_decode(engine):
    a = SeqWork("a", [5, 6, 7, 8, 9], 0, [0], GREEDY)
    first = engine.step([a])[0]
    b = SeqWork("b", [10, 11, 12], 0, [1], GREEDY)
    a2 = SeqWork("a", [first.token_id], 5, [0], GREEDY, num_generated=1)
    chunk = SeqWork("c", [3, 4], 0, [2], GREEDY, sample=False)
    results = engine.step([b, chunk, a2])
    assert [r.job_id for r in results] == ["b", "a"]
    assert all(0 <= r.token_id < engine.model_config.vocab_size for r in results)
    assert all(r.logprob <= 0.0 for r in results)


@pytest.mark.parametrize("work, message", [
    (SeqWork("e", [], 0, [0], GREEDY), "empty"),
    (SeqWork("l", [1] * 600, 0, list(range(38)), GREEDY), "max_model_len=512"),
    (SeqWork("t", [1] * 20, 0, [0], GREEDY), "block_table has 1 blocks"),
    (SeqWork("v", [99999], 0, [0], GREEDY), "vocabulary"),
    (SeqWork("x", [1], 0, [64], GREEDY), "outside"),
])
def test_bad_work_is_a_clear_error(engine, work, message):
    with pytest.raises(ValueError, match=message):
        engine.step([work])


def test_max_tokens_below_one_is_rejected():
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_unknown_architecture_is_a_clear_error(tiny_model_dir, tmp_path):
    for f in tiny_model_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        Engine(tmp_path)


def test_missing_weights_file_is_a_clear_error(tiny_model_dir, tmp_path):
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_bytes((tiny_model_dir / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="safetensors"):
        Engine(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Engine(tmp_path / "nope")
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        Engine(tmp_path)


def test_make_model_rejects_unknown_arch(tmp_path):
    with pytest.raises(ValueError, match="unknown arch 'gpt2'"):
        from fastserve.gpu_worker.model_maker import make_model
        make_model(tmp_path, arch="gpt2")
