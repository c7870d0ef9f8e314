"""Starting the ranks of a replica split over P pipeline stages x T
tensor-parallel ranks (one process each):

    part = launch_rank(model_dir, P, T, rank, "tcp://HOST:PORT", ...)   # or torch's env:// variables
    if part.ctx.rank == 0:
        part.submit(work)      # PipelineLeader: submit / copy_out / copy_in / forget / close
    else:
        part.serve()           # StageRunner: returns once the leader closes
    shutdown_distributed(part.ctx)

`spawn_local` runs P x T such processes on this machine (tests, benchmarks).

Process groups: gloo on the CPU; on CUDA "cpu:gloo,cuda:nccl", so that
headers and batch descriptions (CPU tensors) go over gloo and activations
(device tensors) over NCCL. NCCL refuses two ranks on one GPU: backend="gloo"
on CUDA runs such a replica (a test or a demo) with activations staged
through host memory. Every channel has its own group: a TP group per
stage, one per pipeline lane (stage k TP rank r -> stage k+1 TP rank r) and
one for the replies (last stage -> leader), so the leader's two threads
never share a communicator.
"""
from __future__ import annotations

import os
import socket
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from fastserve.common.model_config import ModelConfig
from fastserve.common.model_split import ModelSplit
from fastserve.gpu_worker.engine import Engine
from fastserve.gpu_worker.leader import PipelineLeader
from fastserve.gpu_worker.stage import StageRunner
from fastserve.gpu_worker.tp_comm import TPComm


@dataclass
class DistContext:
    pipeline_parallel_size: int
    tensor_parallel_size: int
    rank: int
    timeout: float  # seconds before a collective or receive fails
    device: str = "cpu"  # this rank's device
    host_staging: bool = False  # device tensors cross gloo through host memory
    tp_group: object = None
    prev_group: object = None  # lane from the previous stage
    next_group: object = None  # lane to the next stage
    result_group: object = None  # last stage's TP rank 0 <-> leader

    @property
    def world_size(self) -> int:
        return self.pipeline_parallel_size * self.tensor_parallel_size

    @property
    def stage(self) -> int:
        return self.rank // self.tensor_parallel_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tensor_parallel_size


def rank_device(device: str, rank: int) -> str:
    """"cuda" -> this rank's GPU: LOCAL_RANK, else the rank modulo the GPUs."""
    if device != "cuda":
        return device
    local = int(os.environ.get("LOCAL_RANK", rank))
    return f"cuda:{local % torch.cuda.device_count()}"


def init_distributed(pipeline_parallel_size: int = 1, tensor_parallel_size: int = 1, rank: int | None = None,
                     init_method: str | None = None, device: str = "cpu", timeout: float = 300.0,
                     backend: str | None = None) -> DistContext:
    """Join the replica's process group (rank and address default to torch's
    RANK / MASTER_ADDR / MASTER_PORT environment variables) and make every
    channel's group. A one-rank replica needs no process group. backend:
    None (gloo, or NCCL for device tensors on CUDA) or "gloo"."""
    import torch.distributed as dist

    P, T = pipeline_parallel_size, tensor_parallel_size
    if P < 1 or T < 1:
        raise ValueError(f"pipeline and tensor parallel sizes must be >= 1, got {P} and {T}")
    world = P * T
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside a replica of {P} x {T} = {world} ranks")
    env_world = os.environ.get("WORLD_SIZE")
    if init_method is None and env_world is not None and int(env_world) != world:
        raise ValueError(f"WORLD_SIZE={env_world} but {P} stages x {T} tensor-parallel ranks make {world}")
    if backend not in (None, "gloo"):
        raise ValueError(f"backend must be None or 'gloo', got {backend!r}")
    device = rank_device(device, rank)
    dev = torch.device(device)
    ctx = DistContext(P, T, rank, timeout, device, host_staging=dev.type == "cuda" and backend == "gloo")
    if world == 1:
        return ctx
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    td = timedelta(seconds=timeout)
    name = "cpu:gloo,cuda:nccl" if dev.type == "cuda" and backend is None else "gloo"
    dist.init_process_group(name, init_method=init_method or "env://", rank=rank, world_size=world, timeout=td)
    # new_group is collective over the world: every rank makes every group, in the same order.
    for k in range(P):
        group = dist.new_group([k * T + r for r in range(T)], timeout=td) if T > 1 else None
        if k == ctx.stage:
            ctx.tp_group = group
    for k in range(P - 1):
        for r in range(T):
            group = dist.new_group([k * T + r, (k + 1) * T + r], timeout=td)
            if rank == k * T + r:
                ctx.next_group = group
            if rank == (k + 1) * T + r:
                ctx.prev_group = group
    if P > 1:
        group = dist.new_group([0, (P - 1) * T], timeout=td)
        if rank in (0, (P - 1) * T):
            ctx.result_group = group
    return ctx


def shutdown_distributed(ctx: DistContext) -> None:
    import torch.distributed as dist

    if ctx.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def _all_ranks(value: int, op) -> int:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=op)
    return int(t.item())


def build_rank(model_dir: str | Path, ctx: DistContext, *, layer_split: tuple[int, ...] | None = None,
               keepalive_seconds: float | None = None, **engine_options) -> PipelineLeader | StageRunner:
    """This rank's part of the model (an Engine over its shard on
    ctx.device, see Engine.__init__ for engine_options): the PipelineLeader
    on rank 0, a StageRunner to serve() elsewhere. Every rank must get the
    same options; num_gpu_blocks=None sizes the pools by the rank with the
    least room."""
    import torch.distributed as dist

    P, T = ctx.pipeline_parallel_size, ctx.tensor_parallel_size
    split = ModelSplit(ModelConfig.from_model_dir(model_dir), P, T, layer_split)
    multi = ctx.world_size > 1
    tp = TPComm(ctx.tp_group, T, ctx.tp_rank, ctx.stage * T, ctx.host_staging)
    engine = Engine(model_dir, device=ctx.device, split=split, rank=ctx.rank, tp=tp,
                    agree_num_blocks=(lambda n: _all_ranks(n, dist.ReduceOp.MIN)) if multi else None,
                    **engine_options)
    if multi:
        for name in ("num_gpu_blocks", "num_host_blocks"):
            n = getattr(engine, name)
            if _all_ranks(n, dist.ReduceOp.MIN) != _all_ranks(n, dist.ReduceOp.MAX):
                raise ValueError(f"the ranks disagree on {name} (this rank: {n}); every rank must use the same "
                                 "block ids")
    runner = StageRunner(engine, ctx)
    if ctx.rank == 0:
        return PipelineLeader(runner, keepalive_seconds or ctx.timeout / 4)
    return runner


def launch_rank(model_dir: str | Path, pipeline_parallel_size: int = 1, tensor_parallel_size: int = 1,
                rank: int | None = None, init_method: str | None = None, *, device: str = "cpu",
                backend: str | None = None, timeout: float = 300.0, num_threads: int | None = None,
                **options) -> PipelineLeader | StageRunner:
    """init_distributed + build_rank: one process's whole start."""
    if num_threads:
        torch.set_num_threads(num_threads)
    ctx = init_distributed(pipeline_parallel_size, tensor_parallel_size, rank, init_method, device, timeout, backend)
    return build_rank(model_dir, ctx, **options)


# ---------------------------------------------------------------- local processes (tests, benchmarks)

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, P: int, T: int, rank: int, init_method: str, timeout: float, threads: int, device: str,
               backend: str | None, args, conn) -> None:
    try:
        torch.set_num_threads(threads)
        ctx = init_distributed(P, T, rank, init_method, device, timeout, backend)
        value = fn(ctx, *args)
        shutdown_distributed(ctx)
        conn.send((True, value))
    except BaseException:
        conn.send((False, traceback.format_exc()))
    finally:
        conn.close()


def spawn_local(fn, pipeline_parallel_size: int, tensor_parallel_size: int, args: tuple = (), *,
                timeout: float = 120.0, threads: int = 1, device: str = "cpu", backend: str | None = None) -> list:
    """Run fn(ctx, *args) in P x T fresh processes joined in one process
    group on a free local port (device "cuda": rank r on GPU r modulo the
    GPUs); returns each rank's return value, by rank. Fails (and kills the
    processes) as soon as a rank raises or dies, or after `timeout` seconds."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    world = pipeline_parallel_size * tensor_parallel_size
    init_method = f"tcp://127.0.0.1:{free_port()}"
    spawn = mp.get_context("spawn")
    procs, conns = [], []
    for rank in range(world):
        mine, theirs = spawn.Pipe(duplex=False)
        p = spawn.Process(target=_rank_main, daemon=True, args=(fn, pipeline_parallel_size, tensor_parallel_size,
                                                                rank, init_method, min(timeout, 300.0), threads,
                                                                device, backend, args, theirs))
        p.start()
        theirs.close()
        procs.append(p)
        conns.append(mine)
    results: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world:
            left = deadline - time.monotonic()
            waiting = [r for r in range(world) if r not in results]
            ready = wait([conns[r] for r in waiting] + [procs[r].sentinel for r in waiting], timeout=max(left, 0))
            if not ready:
                raise TimeoutError(f"ranks {waiting} of a {pipeline_parallel_size}x{tensor_parallel_size} run "
                                   f"did not finish within {timeout}s")
            for r in waiting:
                if conns[r].poll():
                    try:
                        ok, value = conns[r].recv()
                    except EOFError:
                        raise RuntimeError(f"rank {r} exited without a result (exit code {procs[r].exitcode})")
                    if not ok:
                        raise RuntimeError(f"rank {r} failed:\n{value}")
                    results[r] = value
                elif procs[r].exitcode is not None:
                    raise RuntimeError(f"rank {r} died with exit code {procs[r].exitcode}")
    finally:
        for p in procs:
            p.join(timeout=10 if len(results) == world else 0)
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(world)]
