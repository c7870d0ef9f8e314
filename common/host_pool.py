"""The node's host KV pool: one shared-memory file that a KV-store instance
creates and the GPU workers of its replica map.

The pool is a flat byte array of `num_blocks * bytes_per_block` bytes in
/dev/shm (tmpfs: RAM, not disk). Workers map the very same pages with
`torch.from_file(shared=True)`; KV blocks are copied by the worker between
its GPU pool and these pages, never sent through the bus.

Ownership: every KV-store instance makes a new file named after the
deployment's namespace, the replica and its own instance id, creates it
exclusively (O_EXCL: an existing file is never truncated under a worker that
maps it) and holds an exclusive lock on it while it lives. A second owner of
the same path gets a clear error; a file whose owner died (no lock held) is
stale and removed. Workers learn the path from each copy command, so a
restarted KV store's new pool is mapped on its first copy.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from fastserve.common.schemas import PoolSpec

DEFAULT_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")
_PREFIX = "fastserve-kv-"


class PoolInUseError(RuntimeError):
    """Another live KV store owns this pool file."""


def kv_bytes_per_block(model_dir: str | Path, block_size: int, dtype: str = "float32",
                       tensor_parallel_size: int = 1) -> int:
    """Bytes of one KV block (K and V, all layers), from the model's config.json.

    Computed here so the KV store can size the pool without loading the model;
    the worker checks it against the engine's own figure when it maps the pool.
    A replica split over T tensor-parallel ranks stores one chunk per rank
    (common/model_split.py): more bytes only where T exceeds the model's KV
    heads and the ranks hold replicas of them.
    """
    from fastserve.common.model_config import ModelConfig
    from fastserve.common.model_split import DTYPE_BYTES, ModelSplit

    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPE_BYTES)}")
    cfg = ModelConfig.from_model_dir(model_dir)
    return ModelSplit(cfg, 1, tensor_parallel_size).kv_bytes_per_block(block_size, dtype)


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def pool_path(namespace: str, replica: str, instance_id: str, directory: str | Path | None = None) -> Path:
    parts = [p for p in (namespace, replica, instance_id) if p]
    return Path(directory or DEFAULT_DIR) / f"{_PREFIX}{'-'.join(_safe(p) for p in parts)}.bin"


def _locked_by_someone(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def remove_stale_pools(directory: str | Path | None = None) -> list[Path]:
    """Delete pool files whose KV store died without cleaning up (no lock held)."""
    removed = []
    for path in Path(directory or DEFAULT_DIR).glob(f"{_PREFIX}*.bin"):
        if not _locked_by_someone(path):
            try:
                path.unlink()
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed


class HostKVPool:
    """A shared-memory byte pool. `create()` is for the owner (a KV-store
    instance), `attach()` for the workers; only the owner unlinks the file."""

    def __init__(self, spec: PoolSpec, owner: bool, lock_fd: int | None = None):
        import torch

        self.spec = spec
        self.owner = owner
        self._lock_fd = lock_fd
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
        if path.exists():
            if _locked_by_someone(path):
                raise PoolInUseError(f"host KV pool {path} is in use by another KV store; give each KV store its "
                                     f"own --namespace/--replica/--instance-id (or --host-kv-dir)")
            path.unlink(missing_ok=True)  # stale: its owner died
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, spec.nbytes)  # a new, empty file: nobody maps it yet
            return cls(spec, owner=True, lock_fd=fd)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise

    @classmethod
    def attach(cls, spec: PoolSpec) -> "HostKVPool":
        """Map a pool made by a KV store. Fails if the file is missing or of
        another size (a KV store of another model or pool size)."""
        path = Path(spec.path)
        size = path.stat().st_size if path.exists() else None
        if size != spec.nbytes:
            raise FileNotFoundError(f"host KV pool {path} is {'missing' if size is None else f'{size} bytes'}, "
                                    f"expected {spec.nbytes}")
        return cls(spec, owner=False)

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
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
