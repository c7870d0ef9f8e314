"""The node's host KV pool: one shared-memory file that the KV-store service
creates and every GPU worker of the node maps.

The pool is a flat byte array of `num_blocks * bytes_per_block` bytes in
/dev/shm (tmpfs, so it is RAM, not disk). Workers map the very same pages with
`torch.from_file(shared=True)` and hand the tensor to
`Engine(host_kv_buffer=...)`; KV blocks are copied by the worker between its
GPU pool and these pages, never sent through the bus.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")


def kv_bytes_per_block(model_dir: str | Path, block_size: int, dtype: str = "float32",
                       tensor_parallel_size: int = 1) -> int:
    """Bytes of one KV block (K and V, all layers), from the model's config.json.

    Computed here so the KV store can size the pool without loading the model;
    the worker checks it against `Engine.bytes_per_block` when it attaches.
    A replica split over T tensor-parallel ranks stores one chunk per rank
    (common/model_split.py): more bytes only where T exceeds the model's KV
    heads and the ranks hold replicas of them.
    """
    from fastserve.common.model_config import ModelConfig  # the engine's own reading of config.json
    from fastserve.common.model_split import DTYPE_BYTES, ModelSplit

    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPE_BYTES)}")
    cfg = ModelConfig.from_model_dir(model_dir)
    return ModelSplit(cfg, 1, tensor_parallel_size).kv_bytes_per_block(block_size, dtype)


def default_pool_path(replica: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in replica)
    return DEFAULT_DIR / f"fastserve-kv-{safe}.bin"


@dataclass(frozen=True)
class PoolSpec:
    """What a worker needs to map the pool (also sent in the KV store's heartbeat)."""

    path: str
    num_blocks: int
    bytes_per_block: int

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    def to_dict(self) -> dict:
        return {"path": self.path, "num_blocks": self.num_blocks, "bytes_per_block": self.bytes_per_block}

    @classmethod
    def from_dict(cls, d: dict) -> "PoolSpec":
        return cls(str(d["path"]), int(d["num_blocks"]), int(d["bytes_per_block"]))


class HostKVPool:
    """A shared-memory byte pool. `create()` is for the owner (the KV store),
    `attach()` for the workers; only the owner unlinks the file."""

    def __init__(self, spec: PoolSpec, owner: bool):
        import torch

        self.spec = spec
        self.owner = owner
        # A zero-block pool is legal (no host memory): map nothing.
        if spec.nbytes == 0:
            self.tensor = torch.empty(0, dtype=torch.uint8)
        else:
            self.tensor = torch.from_file(spec.path, shared=True, size=spec.nbytes, dtype=torch.uint8)

    @classmethod
    def create(cls, spec: PoolSpec) -> "HostKVPool":
        if spec.num_blocks < 0 or spec.bytes_per_block <= 0:
            raise ValueError(f"bad host pool size: {spec}")
        path = Path(spec.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Truncate to exactly the pool size so a stale file from an earlier
        # run with another model cannot be mapped with the wrong size.
        with open(path, "wb") as f:
            f.truncate(spec.nbytes)
        return cls(spec, owner=True)

    @classmethod
    def attach(cls, spec: PoolSpec, timeout: float = 30.0) -> "HostKVPool":
        """Map a pool made by the KV store, waiting for it to appear."""
        deadline = time.monotonic() + timeout
        path = Path(spec.path)
        while True:
            if path.exists() and path.stat().st_size == spec.nbytes:
                return cls(spec, owner=False)
            if time.monotonic() > deadline:
                size = path.stat().st_size if path.exists() else None
                raise TimeoutError(
                    f"host KV pool {path} not ready after {timeout:.0f}s "
                    f"(size {size}, expected {spec.nbytes}); is the kvstore service running "
                    f"with the same --host-kv-blocks, --block-size and model?")
            time.sleep(0.05)

    def block_view(self):
        """The pool as (num_blocks, bytes_per_block) uint8 rows."""
        return self.tensor.view(self.spec.num_blocks, self.spec.bytes_per_block)

    def close(self) -> None:
        self.tensor = None
        if self.owner:
            try:
                os.unlink(self.spec.path)
            except FileNotFoundError:
                pass
