"""The KV store's record of where each job's KV lives (pure bookkeeping) and
its shared-memory pool."""
from __future__ import annotations

import pytest

from fastserve.common.host_pool import HostKVPool, PoolSpec, kv_bytes_per_block
from fastserve.kvstore.service import PlacementTable


def test_offload_upload_free_cycle_tracks_host_blocks():
    t = PlacementTable(num_host_blocks=8)
    t.begin("a", "offload", [3, 4], [0, 1])
    assert t.jobs["a"].state == "offloading" and t.host_blocks_used() == 2
    t.finish("a", "offload")
    assert t.jobs["a"].state == "host" and t.jobs["a"].gpu_blocks == []
    t.begin("a", "upload", [0, 1], [7, 9])
    t.finish("a", "upload")
    assert t.jobs["a"].state == "gpu" and t.host_blocks_used() == 0
    t.begin("b", "offload", [1], [5])
    t.free("b")
    assert "b" not in t.jobs and t.host_blocks_used() == 0


def test_moves_that_would_corrupt_kv_are_refused():
    t = PlacementTable(num_host_blocks=4)
    t.begin("a", "offload", [0, 1], [0, 1])
    with pytest.raises(ValueError, match="another job"):
        t.begin("b", "offload", [2], [1])
    with pytest.raises(ValueError, match="outside the pool"):
        t.begin("c", "offload", [3], [4])
    assert t.host_blocks_used() == 2 and "b" in t.jobs  # b's record exists but owns nothing


def test_pool_is_shared_between_owner_and_attached_worker(tiny_model_dir, tmp_path):
    bpb = kv_bytes_per_block(tiny_model_dir, block_size=16)
    # tiny: 2 layers x (K, V) x 2 kv heads x head_dim 32 x 16 tokens x 4 bytes
    assert bpb == 2 * 2 * 2 * 32 * 16 * 4
    spec = PoolSpec(str(tmp_path / "pool.bin"), 3, bpb)
    owner = HostKVPool.create(spec)
    worker = HostKVPool.attach(spec, timeout=1)
    worker.block_view()[2, :4] = 7
    assert owner.block_view()[2, :4].tolist() == [7, 7, 7, 7]
    worker.close()
    assert (tmp_path / "pool.bin").exists()  # only the owner removes it
    owner.close()
    assert not (tmp_path / "pool.bin").exists()
    with pytest.raises(TimeoutError, match="kvstore"):
        HostKVPool.attach(spec, timeout=0.1)
