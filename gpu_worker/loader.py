"""Load a LLaMA-family safetensors checkpoint, or one rank's part of it,
into fused tensors.

q/k/v and gate/up projections are concatenated at load time so a layer runs
two matmuls fewer per step. A tensor-parallel rank reads its query and KV
heads (the q/k/v rows and o's columns), its MLP columns (gate/up rows and
down's columns) and its vocabulary rows straight from the files."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fastserve.common.model_config import ModelConfig
from fastserve.common.model_split import ModelSplit, RankShard

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


class _Checkpoint:
    """Reads tensors, or row/column slices of them, from safetensors files
    without loading the rest: a rank reads only its part of the model."""

    def __init__(self, files: list[Path], dtype, device):
        from safetensors import safe_open
        from tqdm.auto import tqdm

        self.dtype, self.device = dtype, device
        self.handles = [safe_open(str(f), framework="pt") for f in files]
        self.where = {name: h for h in self.handles for name in h.keys() if not name.endswith("rotary_emb.inv_freq")}
        total = sum(f.stat().st_size for f in files)
        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading weights",
                        disable=total < _PROGRESS_MIN_BYTES)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.where[name].get_slice(name).get_shape())

    def read(self, name: str, rows: range | None = None, cols: range | None = None):
        """The tensor, or rows/cols of it; rows past its end read as zeros (padding)."""
        import torch

        part = self.where[name].get_slice(name)
        shape = part.get_shape()
        r = rows if rows is not None else range(shape[0])
        stop = min(r.stop, shape[0])
        if cols is None:
            t = part[r.start:stop]
        else:
            t = part[r.start:stop, cols.start:cols.stop]
        self.bar.update(t.numel() * t.element_size())
        t = t.to(device=self.device, dtype=self.dtype)
        if stop < r.stop:
            t = torch.cat([t, t.new_zeros((r.stop - stop, *t.shape[1:]))])
        return t

    def close(self) -> None:
        self.bar.close()
        self.handles.clear()


def _expected_names(config: ModelConfig) -> tuple[set[str], set[str]]:
    """(required, optional) tensor names of the unsplit model."""
    required = {"model.embed_tokens.weight", "model.norm.weight"}
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if not config.tie_word_embeddings:
        required.add("lm_head.weight")
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        required |= {p + n for n in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                     "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                                     "mlp.down_proj.weight")}
        required |= {p + f"self_attn.{n}_proj.weight" for n in "qkv"}
        biases = {p + f"self_attn.{n}_proj.bias" for n in "qkv"}
        (required if config.qkv_bias else optional).update(biases)
        (required if config.o_bias else optional).add(p + "self_attn.o_proj.bias")
    return required, optional


def load_weights(model_dir: str | Path, config: ModelConfig, dtype: str = "float32", device="cpu",
                 shard: RankShard | None = None) -> ModelWeights:
    """The weights of `shard` (default: the whole model). Only the shard's
    tensors and slices are read; what it does not hold is None (the
    embedding off the first stage, the final norm and projection off the
    last)."""
    import torch

    model_dir = Path(model_dir)
    dt = torch_dtype(dtype)
    shard = shard or ModelSplit(config).shard(0, 0)
    ck = _Checkpoint(checkpoint_files(model_dir), dt, device)
    try:
        required, optional = _expected_names(config)
        missing = sorted(required - set(ck.where))
        if missing:
            raise KeyError(f"checkpoint in {model_dir} lacks tensor {missing[0]!r}")
        unused = sorted(set(ck.where) - required - optional)
        if unused:
            raise ValueError(f"checkpoint has tensors this {config.arch} model does not use, e.g. {unused[:3]}")
        embed_rows = ck.shape("model.embed_tokens.weight")[0]
        if embed_rows != config.vocab_size:
            raise ValueError(f"embed_tokens has {embed_rows} rows but config.json says vocab_size={config.vocab_size}")

        hd = config.head_dim
        q_rows = range(shard.q_heads.start * hd, shard.q_heads.stop * hd)
        kv_rows = range(shard.kv_heads.start * hd, shard.kv_heads.stop * hd)
        split = shard.tp_size > 1
        layers = []
        for i in shard.layers:
            p = f"model.layers.{i}."
            for n, heads in (("q", config.num_heads), ("k", config.num_kv_heads)):
                shape = ck.shape(p + f"self_attn.{n}_proj.weight")
                assert shape == (heads * hd, config.hidden_size), (p + f"{n}_proj", shape)

            def qkv(kind: str) -> object:
                names = [p + f"self_attn.{n}_proj.{kind}" for n in "qkv"]
                return torch.cat([ck.read(names[0], q_rows), ck.read(names[1], kv_rows),
                                  ck.read(names[2], kv_rows)]).contiguous()

            inter = shard.intermediate
            layers.append(LayerWeights(
                in_norm=ck.read(p + "input_layernorm.weight"),
                qkv_w=qkv("weight"),
                qkv_b=qkv("bias") if config.qkv_bias else None,
                o_w=ck.read(p + "self_attn.o_proj.weight", cols=q_rows if split else None),
                o_b=ck.read(p + "self_attn.o_proj.bias") if config.o_bias else None,
                post_norm=ck.read(p + "post_attention_layernorm.weight"),
                gate_up_w=torch.cat([ck.read(p + "mlp.gate_proj.weight", inter),
                                     ck.read(p + "mlp.up_proj.weight", inter)]).contiguous(),
                down_w=ck.read(p + "mlp.down_proj.weight", cols=inter if split else None),
            ))
        vocab = shard.vocab
        embed = ck.read("model.embed_tokens.weight", vocab) if shard.first else None
        norm = lm_head = None
        if shard.last:
            norm = ck.read("model.norm.weight")
            if config.tie_word_embeddings:
                lm_head = embed if embed is not None else ck.read("model.embed_tokens.weight", vocab)
            else:
                lm_head = ck.read("lm_head.weight", vocab)
        return ModelWeights(embed=embed, layers=layers, norm=norm, lm_head=lm_head)
    finally:
        ck.close()
