"""The engine's CLI commands, the profile JSON the scheduler reads, sharded
checkpoints and the half-precision dtypes."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastserve.cli import main
from fastserve.gpu_worker.batch import SeqWork
from fastserve.gpu_worker.engine import Engine
from fastserve.gpu_worker.profiler import profile_engine


def run_cli(*argv):
    return main([str(a) for a in argv])


def test_make_model_then_generate_json(tmp_path, capsys):
    out = tmp_path / "m"
    assert run_cli("make-model", out, "--arch", "qwen2", "--seed", "3") == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    capsys.readouterr()
    assert run_cli("generate", "--model", out, "--prompt", "Hello", "--prompt", "The quick brown fox",
                   "--max-tokens", "5", "--ignore-eos", "--json") == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d["prompt"] for d in lines] == ["Hello", "The quick brown fox"]
    assert all(len(d["token_ids"]) == 5 and isinstance(d["text"], str) for d in lines)


def test_generate_reports_bad_input(tiny_model_dir, capsys):
    assert run_cli("generate", "--model", tiny_model_dir, "--prompt", "", "--max-tokens", "4") == 2
    assert "empty prompt" in capsys.readouterr().err
    assert run_cli("generate", "--model", tiny_model_dir, "--prompt", "hi", "--max-tokens", "0") == 2
    assert "max_tokens" in capsys.readouterr().err


def test_profile_writes_the_cost_model_format(tiny_model_dir, tmp_path):
    path = tmp_path / "profile.json"
    assert run_cli("profile", "--model", tiny_model_dir, "--out", path, "--quick", "--repeats", "1") == 0
    prof = json.loads(path.read_text())
    assert set(prof) == {"model", "device", "block_size", "prefill", "decode"}
    assert prof["block_size"] == 16 and prof["device"] == "cpu"
    assert [p["tokens"] for p in prof["prefill"]] == sorted(p["tokens"] for p in prof["prefill"])
    assert all(p["seconds"] > 0 for p in prof["prefill"] + prof["decode"])
    assert {(d["batch_size"], d["context_len"]) for d in prof["decode"]} >= {(1, 64), (4, 64)}


def test_profile_skips_points_that_do_not_fit(tiny_model_dir):
    engine = Engine(tiny_model_dir, num_gpu_blocks=8)  # 128 tokens of KV
    prof = profile_engine(engine, quick=True, repeats=1)
    assert max(p["tokens"] for p in prof["prefill"]) <= 128
    assert all(d["batch_size"] * d["context_len"] <= 128 for d in prof["decode"])


def test_sharded_checkpoint_loads_like_the_single_file(tiny_model_dir, tmp_path):
    tensors = load_file(str(tiny_model_dir / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / fname))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_model_dir / name).read_bytes())
    ids = list(range(5, 25))
    one = Engine(tiny_model_dir, num_gpu_blocks=4).forward([SeqWork("a", ids, 0, [0, 1])])
    sharded = Engine(tmp_path, num_gpu_blocks=4).forward([SeqWork("a", ids, 0, [0, 1])])
    torch.testing.assert_close(one, sharded)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        Engine(tmp_path)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_close_to_float32(tiny_model_dir, dtype):
    ids = list(range(5, 45))
    f32 = Engine(tiny_model_dir, num_gpu_blocks=4).forward([SeqWork("a", ids, 0, [0, 1, 2])], all_logits=True)
    half = Engine(tiny_model_dir, dtype=dtype, num_gpu_blocks=4).forward([SeqWork("a", ids, 0, [0, 1, 2])],
                                                                         all_logits=True)
    assert half.dtype == torch.float32 and half.shape == f32.shape
    err = (half - f32).abs().max() / f32.abs().max()
    assert err < 0.05, err
    # most next-token argmaxes survive the precision loss
    assert (half.argmax(-1) == f32.argmax(-1)).float().mean() > 0.8


def test_bfloat16_without_avx512(tiny_model_dir):
    """oneDNN limited to AVX2 stands in for a CPU without AVX-512 (e.g. AMD
    EPYC Zen 2/3): bfloat16 must still load and run, by the unpacked path."""
    import subprocess
    import sys

    code = (
        "import torch, sys\n"
        "from fastserve.gpu_worker.engine import Engine\n"
        "from fastserve.gpu_worker.batch import SeqWork\n"
        "assert not torch.ops.mkldnn._is_mkldnn_bf16_supported()\n"
        f"e = Engine({str(tiny_model_dir)!r}, dtype='bfloat16', num_gpu_blocks=4)\n"
        "out = e.forward([SeqWork('a', list(range(5, 25)), 0, [0, 1])])\n"
        "assert out.shape[0] == 1 and torch.isfinite(out).all()\n"
        "print('ok')\n")
    env = {**__import__("os").environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_the_1b_preset_has_llama_3_2_1b_shapes(tiny_model_dir):
    """The GPU benchmark model's config (its 2.5 GB of weights are not made here)."""
    from safetensors.torch import load_file as load

    from fastserve.common.model_config import ModelConfig
    from fastserve.gpu_worker.model_maker import build_tokenizer, model_config, num_parameters, padded_tokenizer

    cfg = model_config("llama", "1b", 128256)
    mc = ModelConfig.from_dict(cfg)
    assert (mc.hidden_size, mc.num_layers, mc.num_heads, mc.num_kv_heads, mc.head_dim) == (2048, 16, 32, 8, 64)
    assert mc.rope_scaling["rope_type"] == "llama3" and mc.tie_word_embeddings and cfg["torch_dtype"] == "bfloat16"
    assert abs(num_parameters(cfg) - 1_235_814_400) < 1e6  # Llama-3.2-1B: 1.24B
    tok = padded_tokenizer(build_tokenizer(4096), 128256)
    assert tok.get_vocab_size() == 128256 and tok.decode([128255], skip_special_tokens=False)
    # num_parameters counts what make_model writes:
    written = sum(t.numel() for t in load(str(tiny_model_dir / "model.safetensors")).values())
    assert written == num_parameters(__import__("json").loads((tiny_model_dir / "config.json").read_text()))
