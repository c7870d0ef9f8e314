"""Load a LLaMA-family safetensors checkpoint into fused tensors.

q/k/v and gate/up projections are concatenated at load time so a layer runs
two matmuls fewer per step."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fastserve.common.model_config import ModelConfig

DTYPES = ("float32", "bfloat16", "float16")
# Show a progress bar only where loading takes long enough to wonder.
_PROGRESS_MIN_BYTES = 256 * 2**20


@dataclass
class LayerWeights:
    in_norm: object
    qkv_w: object
    qkv_b: object | None
    o_w: object
    o_b: object | None
    post_norm: object
    gate_up_w: object
    down_w: object


@dataclass
class ModelWeights:
    embed: object
    layers: list[LayerWeights]
    norm: object
    lm_head: object


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"checkpoint shards listed in {index.name} are missing: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")):
        raise FileNotFoundError(f"{model_dir} has only PyTorch .bin/.pt weights; convert them to safetensors")
    raise FileNotFoundError(f"no model.safetensors (or shards with an index) in {model_dir}")


def _read_tensors(files: list[Path], dtype, device) -> dict:
    from safetensors import safe_open
    from tqdm.auto import tqdm

    total = sum(f.stat().st_size for f in files)
    out = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights",
              disable=total < _PROGRESS_MIN_BYTES) as bar:
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    if name.endswith("rotary_emb.inv_freq"):
                        continue  # recomputed from config
                    t = sf.get_tensor(name)
                    bar.update(t.numel() * t.element_size())
                    out[name] = t.to(device=device, dtype=dtype)
    return out


def load_weights(model_dir: str | Path, config: ModelConfig, dtype: str = "float32", device="cpu") -> ModelWeights:
    import torch

    model_dir = Path(model_dir)
    dt = torch_dtype(dtype)
    raw = _read_tensors(checkpoint_files(model_dir), dt, device)
    used: set[str] = set()

    def take(name: str, required: bool = True):
        t = raw.get(name)
        if t is None and required:
            raise KeyError(f"checkpoint in {model_dir} lacks tensor {name!r}")
        if t is not None:
            used.add(name)
        return t

    layers = []
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        q, k, v = (take(p + f"self_attn.{n}_proj.weight") for n in "qkv")
        assert q.shape == (config.num_heads * config.head_dim, config.hidden_size), (p + "q_proj", q.shape)
        assert k.shape == (config.num_kv_heads * config.head_dim, config.hidden_size), (p + "k_proj", k.shape)
        biases = [take(p + f"self_attn.{n}_proj.bias", required=config.qkv_bias) for n in "qkv"]
        qkv_b = torch.cat(biases) if config.qkv_bias else None
        layers.append(LayerWeights(
            in_norm=take(p + "input_layernorm.weight"),
            qkv_w=torch.cat([q, k, v]).contiguous(),
            qkv_b=qkv_b,
            o_w=take(p + "self_attn.o_proj.weight"),
            o_b=take(p + "self_attn.o_proj.bias", required=config.o_bias),
            post_norm=take(p + "post_attention_layernorm.weight"),
            gate_up_w=torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]).contiguous(),
            down_w=take(p + "mlp.down_proj.weight"),
        ))
    embed = take("model.embed_tokens.weight")
    lm_head = take("lm_head.weight", required=not config.tie_word_embeddings)
    if lm_head is None or config.tie_word_embeddings:
        lm_head = embed
    if embed.shape[0] != config.vocab_size:
        raise ValueError(f"embed_tokens has {embed.shape[0]} rows but config.json says vocab_size={config.vocab_size}")
    weights = ModelWeights(embed=embed, layers=layers, norm=take("model.norm.weight"), lm_head=lm_head)
    unused = sorted(set(raw) - used - {"lm_head.weight"})
    if unused:
        raise ValueError(f"checkpoint has tensors this {config.arch} model does not use, e.g. {unused[:3]}")
    raw.clear()
    return weights
