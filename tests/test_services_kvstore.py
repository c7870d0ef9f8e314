"""The KV store's host table (host block ids and the copy schedule, pure) and
its shared-memory pool: never shared by accident, never truncated while mapped."""
from __future__ import annotations

import multiprocessing
import os

import pytest

from fastserve.common.host_pool import (
    HostKVPool, PoolInUseError, PoolSpec, kv_bytes_per_block, pool_path, remove_stale_pools,
)
from fastserve.kvstore.host_table import HostTable, Move


def test_offload_upload_cycle_assigns_and_returns_host_blocks():
    t = HostTable(num_blocks=8, max_in_flight=4)
    assert t.add(Move(1, "a", "offload", [3, 4])) is None
    (m,), refused = t.start(0.0)
    assert refused == [] and len(m.host_blocks) == 2 and t.blocks_used == 2
    assert t.finish(1, ok=True) is m and t.jobs_on_host() == 1 and t.blocks_used == 2  # the copy is on the host
    assert t.add(Move(2, "a", "upload", [7, 9])) is None
    (up,), _ = t.start(1.0)
    assert up.host_blocks == m.host_blocks  # it reads back the blocks it wrote
    t.finish(2, ok=True)
    assert t.blocks_used == 0 and t.jobs_on_host() == 0
    assert t.finish(2, ok=True) is None  # a second report of the same move changes nothing


def test_link_limit_and_upload_order():
    t = HostTable(num_blocks=16, max_in_flight=1)
    for i, job in enumerate("abc"):
        t.add(Move(i, job, "offload", [i]))
    started, _ = t.start(0.0)
    assert [m.job_id for m in started] == ["a"]  # one at a time on the link
    t.finish(0, ok=True)
    assert [m.job_id for m in t.start(0.0)[0]] == ["b"]


def test_moves_that_cannot_be_right_are_refused():
    t = HostTable(num_blocks=3, max_in_flight=4)
    assert "no host copy" in t.add(Move(1, "x", "upload", [0]))
    assert "exceed the host pool" in t.add(Move(2, "big", "offload", [0, 1, 2, 3]))
    t.add(Move(3, "a", "offload", [0, 1]))
    t.add(Move(4, "b", "offload", [2, 3]))
    started, refused = t.start(0.0)
    assert [m.job_id for m in started] == ["a"] and [m.job_id for m, _ in refused] == ["b"]
    assert "host pool full" in refused[0][1]
    assert "already" in t.add(Move(5, "a", "offload", [0, 1]))


def test_a_failed_offload_or_a_free_returns_blocks_once_no_copy_uses_them():
    t = HostTable(num_blocks=4, max_in_flight=4)
    t.add(Move(1, "a", "offload", [0, 1]))
    t.start(0.0)
    t.finish(1, ok=False)
    assert t.blocks_used == 0 and t.jobs_on_host() == 0
    t.add(Move(2, "b", "offload", [0, 1]))
    t.start(0.0)
    t.free("b")  # the copy still writes its blocks
    assert t.blocks_used == 2
    t.finish(2, ok=True)
    assert t.blocks_used == 0 and t.jobs_on_host() == 0
    t.add(Move(3, "c", "offload", [0]))
    t.start(0.0)
    assert [m.move_id for m in t.overdue(10.0, timeout=5.0)] == [3] and t.overdue(1.0, timeout=5.0) == []


def test_pool_is_shared_between_owner_and_attached_worker(tiny_model_dir, tmp_path):
    bpb = kv_bytes_per_block(tiny_model_dir, block_size=16)
    # tiny: 2 layers x (K, V) x 2 kv heads x head_dim 32 x 16 tokens x 4 bytes
    assert bpb == 2 * 2 * 2 * 32 * 16 * 4
    spec = PoolSpec(str(tmp_path / "pool.bin"), 3, bpb)
    owner = HostKVPool.create(spec)
    worker = HostKVPool.attach(spec)
    worker.block_view()[2, :4] = 7
    assert owner.block_view()[2, :4].tolist() == [7, 7, 7, 7]
    worker.close()
    assert (tmp_path / "pool.bin").exists()  # only the owner removes it
    owner.close()
    assert not (tmp_path / "pool.bin").exists()
    with pytest.raises(FileNotFoundError, match="missing"):
        HostKVPool.attach(spec)


def test_pool_names_are_unique_per_instance(tmp_path):
    a = pool_path("ns", "r0", "kvstore-r0-aaaa", tmp_path)
    b = pool_path("ns", "r0", "kvstore-r0-bbbb", tmp_path)
    c = pool_path("other", "r0", "kvstore-r0-aaaa", tmp_path)
    assert len({a, b, c}) == 3 and a.parent == tmp_path


def _hold_pool(path: str, ready, done) -> None:
    pool = HostKVPool.create(PoolSpec(path, 2, 64))
    ready.set()
    done.wait(30)
    pool.close()


def test_a_second_owner_is_refused_and_a_live_pool_is_never_truncated(tmp_path):
    path = str(tmp_path / "fastserve-kv-live.bin")
    ctx = multiprocessing.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_pool, args=(path, ready, done))
    proc.start()
    try:
        assert ready.wait(30)
        mapped = HostKVPool.attach(PoolSpec(path, 2, 64))
        mapped.block_view()[1, :3] = 5
        with pytest.raises(PoolInUseError, match="in use by another KV store"):
            HostKVPool.create(PoolSpec(path, 2, 64))
        assert remove_stale_pools(tmp_path) == []  # locked: not stale
        assert mapped.block_view()[1, :3].tolist() == [5, 5, 5] and os.path.getsize(path) == 128
    finally:
        done.set()
        proc.join(30)
    assert not os.path.exists(path)


def test_a_dead_owners_pool_is_stale_and_replaced(tmp_path):
    path = tmp_path / "fastserve-kv-dead.bin"
    path.write_bytes(b"\1" * 128)  # left behind by a KV store killed with SIGKILL: no lock
    assert remove_stale_pools(tmp_path) == [path] and not path.exists()
    path.write_bytes(b"\1" * 128)
    pool = HostKVPool.create(PoolSpec(str(path), 4, 64))  # a new, zeroed file
    assert pool.block_view().sum().item() == 0 and os.path.getsize(path) == 256
    pool.close()


def test_a_plan_published_twice_moves_once():
    """A plan retried after its confirm was lost arrives twice: its moves are
    already queued, running or done, and must not be refused (the refusal
    would fail the real move at the scheduler) nor run again."""
    t = HostTable(num_blocks=8, max_in_flight=4)
    plan = [Move(1, "a", "offload", [0, 1]), Move(2, "b", "offload", [2])]
    assert t.add_plan(plan) == []
    started, _ = t.start(0.0)
    assert t.add_plan([Move(1, "a", "offload", [0, 1]), Move(2, "b", "offload", [2])]) == []
    assert t.duplicates == 2 and t.start(0.0) == ([], [])
    t.finish(1, ok=True)
    assert t.add_plan([Move(1, "a", "offload", [0, 1])]) == [] and t.jobs_on_host() == 2
    # The next plan's moves (higher ids) run, an upload before an offload included.
    assert t.add_plan([Move(4, "c", "offload", [3]), Move(3, "a", "upload", [5, 6])]) == []
    assert sorted(m.move_id for m in t.start(1.0)[0]) == [3, 4]
