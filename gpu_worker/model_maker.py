"""Random-weight Hugging Face checkpoints with a real byte-level BPE tokenizer:
how tests, demos and benchmarks get models on a machine with no model hub."""
from __future__ import annotations

import functools
import json
import random
from pathlib import Path

ARCHS = ("llama", "mistral", "qwen2")

PRESETS = {
    # about 0.7M parameters: fast enough for every test
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    # about 28M parameters: the benchmark model
    "small": dict(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048),
    # Llama-3.2-1B's shapes (1.24B parameters, bfloat16): the GPU benchmark
    # model. Its 128,256-entry vocabulary is the BPE tokenizer padded with
    # filler tokens (every id decodes), the rest as the real model's config.json.
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072),
}
# What a preset fixes beside its shapes (llama only for "1b").
_PRESET_CONFIG = {
    "1b": dict(rope_theta=500000.0, tie_word_embeddings=True, torch_dtype="bfloat16",
               rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}
# The BPE tokenizer trains to at most this many entries on the built-in corpus;
# a larger vocabulary is padded with filler tokens.
_TRAINED_VOCAB = 4096

_ARCH_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

SPECIAL_TOKENS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
BOS, EOS, IM_START, IM_END = range(4)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TEXT = """\
The quick brown fox jumps over the lazy dog. A serving system answers many requests at once.
Large language models generate one token at a time; every new token needs the keys and values
of all the tokens before it, kept in a cache. When memory runs short, the cache of a waiting job
can move to host memory and come back later. Short jobs should not wait behind long ones: a
multi-level feedback queue lets every job start with high priority and demotes it as it runs.
Hello, world! How are you today? I am fine, thank you. What is the capital of France? Paris.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159. Symbols: + - * / = < > ( ) [ ] { } # @ & %.
def main():\n    print("hello")\n    return 0\n
Émile a mangé une crème brûlée à Zürich; 東京 は 日本 の 首都 です. Ünïcödé çhàrs ärè fïné 🙂.
"""

_SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]


def _corpus(seed: int = 1234) -> list[str]:
    """The built-in text plus deterministic pseudo-words, so BPE can learn as
    many merges as the `small` vocabulary asks for."""
    rng = random.Random(seed)
    lines = _TEXT.splitlines() * 20
    words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(6000)]
    for _ in range(4000):
        lines.append(" ".join(rng.choice(words) for _ in range(12)))
    return lines


@functools.lru_cache(maxsize=4)  # training takes a second; tests make many models
def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def model_config(arch: str, preset: str, vocab_size: int, **overrides) -> dict:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = dict(PRESETS[preset])
    cfg = {
        "architectures": [_ARCH_CLASS[arch]],
        "model_type": arch,
        **p,
        "vocab_size": vocab_size,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6 if arch != "llama" else 1e-5,
        "rope_theta": 10000.0 if arch != "qwen2" else 1000000.0,
        "tie_word_embeddings": arch == "qwen2",
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "torch_dtype": "float32",
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
    }
    if preset in _PRESET_CONFIG:
        if arch != "llama":
            raise ValueError(f"preset {preset!r} is a llama model")
        cfg.update(attention_bias=False, mlp_bias=False, **_PRESET_CONFIG[preset])
    elif arch == "llama":
        cfg.update(attention_bias=False, mlp_bias=False, rope_scaling=None)
    elif arch == "mistral":
        cfg.update(sliding_window=None)
    else:
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=p["num_hidden_layers"])
    cfg.update(overrides)
    return cfg


def _random_weights(cfg: dict, seed: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // nh
    qkv_bias = cfg["model_type"] == "qwen2" or cfg.get("attention_bias", False)

    def lin(out_f: int, in_f: int) -> torch.Tensor:
        # fan-in scaling keeps activations O(1), so logits are spread out and
        # greedy argmax is well separated (near-ties would make equivalence
        # tests depend on float rounding).
        return torch.randn(out_f, in_f, generator=g) / in_f**0.5

    def vec(n: int, scale: float) -> torch.Tensor:
        return torch.randn(n, generator=g) * scale

    w = {"model.embed_tokens.weight": torch.randn(v, h, generator=g)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1.0 + vec(h, 0.1)
        w[p + "post_attention_layernorm.weight"] = 1.0 + vec(h, 0.1)
        w[p + "self_attn.q_proj.weight"] = lin(nh * hd, h)
        w[p + "self_attn.k_proj.weight"] = lin(nkv * hd, h)
        w[p + "self_attn.v_proj.weight"] = lin(nkv * hd, h)
        w[p + "self_attn.o_proj.weight"] = lin(h, nh * hd)
        if qkv_bias:
            w[p + "self_attn.q_proj.bias"] = vec(nh * hd, 0.1)
            w[p + "self_attn.k_proj.bias"] = vec(nkv * hd, 0.1)
            w[p + "self_attn.v_proj.bias"] = vec(nkv * hd, 0.1)
            if cfg["model_type"] != "qwen2":
                w[p + "self_attn.o_proj.bias"] = vec(h, 0.1)
        w[p + "mlp.gate_proj.weight"] = lin(inter, h)
        w[p + "mlp.up_proj.weight"] = lin(inter, h)
        w[p + "mlp.down_proj.weight"] = lin(h, inter)
    w["model.norm.weight"] = 1.0 + vec(h, 0.1)
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = lin(v, h) * 4.0
    return {k: t.contiguous() for k, t in w.items()}


def make_model(out_dir: str | Path, arch: str = "llama", preset: str = "tiny", seed: int = 0, **overrides) -> Path:
    """Write a random-weight checkpoint to out_dir and return its path.

    `overrides` replace config.json fields (e.g. tie_word_embeddings=True,
    rope_scaling={...}, attention_bias=True) for tests of specific features."""
    from safetensors.torch import save_file

    model_config(arch, preset, 0)  # validates arch/preset before any work
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = PRESETS[preset]["vocab_size"]
    tok = build_tokenizer(min(vocab, _TRAINED_VOCAB))
    if vocab > tok.get_vocab_size():
        tok = padded_tokenizer(tok, vocab)
    cfg = model_config(arch, preset, tok.get_vocab_size(), **overrides)
    cfg["vocab_size"] = tok.get_vocab_size()  # logits index the tokenizer exactly
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[BOS],
        "eos_token": SPECIAL_TOKENS[EOS],
        "pad_token": SPECIAL_TOKENS[EOS],
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": cfg["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }, indent=2))
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": BOS, "eos_token_id": [EOS, IM_END], "do_sample": False,
    }, indent=2))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    weights = _random_weights(cfg, seed)
    if cfg["torch_dtype"] != "float32":
        import torch

        weights = {k: t.to(getattr(torch, cfg["torch_dtype"])) for k, t in weights.items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def padded_tokenizer(tok, vocab_size: int):
    """The trained BPE tokenizer with filler tokens up to `vocab_size`, so a
    large vocabulary's every id decodes to something."""
    from tokenizers import AddedToken, Tokenizer

    padded = Tokenizer.from_str(tok.to_str())
    n = vocab_size - padded.get_vocab_size()
    padded.add_tokens([AddedToken(f"<|filler_{i}|>", special=False) for i in range(n)])
    assert padded.get_vocab_size() == vocab_size, (padded.get_vocab_size(), vocab_size)
    return padded


def num_parameters(cfg: dict) -> int:
    """Parameters a config.json describes (llama family), without making them."""
    h, inter, v, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    layer = h * (q + 2 * kv) + q * h + 3 * h * inter + 2 * h
    return v * h * (1 if cfg["tie_word_embeddings"] else 2) + L * layer + h
