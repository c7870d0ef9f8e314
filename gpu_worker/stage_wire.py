"""What travels between the ranks of a split replica over torch.distributed.

An item (a batch, a KV copy, a keepalive, the stop order, or a reply to the
leader) is a fixed-size header, the item's description and, for a batch
between stages, the residual stream. The header is a uint8 CPU tensor (gloo
also in an NCCL world): int64 fields [kind, seq, description bytes, hidden
rows, then (compute ns, transfer ns) per stage], followed by the description
itself when it fits, which saves a message per hop for every usual batch.
Descriptions are msgpack maps of named columns, never pickle. The residual
stream is a (rows, hidden_size) tensor on the model's device, so NCCL moves
it GPU to GPU.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from enum import IntEnum

import msgpack
import torch

from fastserve.common.sampling_params import SamplingParams
from fastserve.gpu_worker.batch import SeqResult, SeqWork

HEADER_BYTES = 16384
_FIELDS = 4
# Sends are asynchronous (gloo completes one only when the peer receives it);
# past this many unfinished ones the sender waits for the oldest.
_MAX_OUTSTANDING = 8


class Kind(IntEnum):
    BATCH = 1
    COPY = 2
    NOOP = 3  # keepalive: an idle pipeline's receives never reach the group timeout
    STOP = 4
    RESULT = 5  # replies, last stage -> leader
    COPY_DONE = 6


@dataclass
class Item:
    kind: Kind
    seq: int
    desc: bytes = b""
    hidden: torch.Tensor | None = None
    timings: list[int] = field(default_factory=list)  # ns, (compute, transfer) per stage


def encode_work(work: list[SeqWork], release: list[str] | tuple[str, ...] = ()) -> bytes:
    """`release`: jobs whose sampling state the last stage forgets first."""
    params: dict[SamplingParams, int] = {}
    cols = {"job_id": [], "token_ids": [], "num_computed": [], "block_table": [], "sample": [],
            "num_generated": [], "sampling": []}
    for w in work:
        cols["job_id"].append(w.job_id)
        cols["token_ids"].append(w.token_ids)
        cols["num_computed"].append(w.num_computed)
        cols["block_table"].append(w.block_table)
        cols["sample"].append(w.sample)
        cols["num_generated"].append(w.num_generated)
        cols["sampling"].append(params.setdefault(w.sampling, len(params)))
    cols["params"] = [p.to_dict() for p in params]
    cols["release"] = list(release)
    return msgpack.packb(cols, use_bin_type=True)


def decode_release(data: bytes) -> list[str]:
    return msgpack.unpackb(data, raw=False).get("release") or []


def decode_work(data: bytes) -> list[SeqWork]:
    c = msgpack.unpackb(data, raw=False)
    params = [SamplingParams.from_dict(p) for p in c["params"]]
    return [SeqWork(job_id, tokens, done, table, params[sp], generated, sample)
            for job_id, tokens, done, table, sp, generated, sample in zip(
                c["job_id"], c["token_ids"], c["num_computed"], c["block_table"], c["sampling"],
                c["num_generated"], c["sample"])]


def encode_results(results: list[SeqResult]) -> bytes:
    return msgpack.packb({"job_id": [r.job_id for r in results], "token_id": [r.token_id for r in results],
                          "logprob": [r.logprob for r in results],
                          "top_logprobs": [r.top_logprobs for r in results],
                          "prompt_logprobs": [r.prompt_logprobs for r in results]}, use_bin_type=True)


def decode_results(data: bytes) -> list[SeqResult]:
    c = msgpack.unpackb(data, raw=False)
    prompt = c.get("prompt_logprobs") or [None] * len(c["job_id"])
    return [SeqResult(j, t, lp, [tuple(x) for x in top] if top is not None else None,
                      [(v, rank, [tuple(x) for x in alts]) for v, rank, alts in p] if p is not None else None)
            for j, t, lp, top, p in zip(c["job_id"], c["token_id"], c["logprob"], c["top_logprobs"], prompt)]


def encode_copy(direction: str, gpu_blocks: list[int], host_blocks: list[int],
                pool: tuple[str, int, int] | None = None) -> bytes:
    """pool: (path, num_blocks, bytes_per_block) of the host pool to copy to or
    from, when every rank must map it first (a KV store's shared memory)."""
    return msgpack.packb({"direction": direction, "gpu_blocks": gpu_blocks, "host_blocks": host_blocks,
                          "pool": list(pool) if pool else None})


def decode_copy(data: bytes) -> tuple[str, list[int], list[int], tuple[str, int, int] | None]:
    c = msgpack.unpackb(data, raw=False)
    pool = c.get("pool")
    return c["direction"], c["gpu_blocks"], c["host_blocks"], tuple(pool) if pool else None


def _pack(item: Item, num_stages: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> (header, description tensor when it does not fit in the header)."""
    n = _FIELDS + 2 * num_stages
    header = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
    rows = 0 if item.hidden is None else item.hidden.shape[0]
    timings = item.timings or [0] * (2 * num_stages)
    header[:8 * n].view(torch.int64).copy_(torch.tensor([item.kind, item.seq, len(item.desc), rows, *timings]))
    desc = torch.frombuffer(bytearray(item.desc), dtype=torch.uint8) if item.desc else None
    if desc is not None and len(item.desc) <= HEADER_BYTES - 8 * n:
        header[8 * n:8 * n + len(item.desc)] = desc
        desc = None
    return header, desc


def _unpack(header: torch.Tensor, num_stages: int) -> tuple[Item, int, int]:
    """-> (item without its hidden rows, rows, description bytes that follow)."""
    n = _FIELDS + 2 * num_stages
    kind, seq, size, rows, *timings = header[:8 * n].view(torch.int64).tolist()
    inline = size <= HEADER_BYTES - 8 * n
    desc = header[8 * n:8 * n + size].numpy().tobytes() if inline else b""
    return Item(Kind(kind), seq, desc, None, timings), rows, 0 if inline else size


class Link:
    """Items one way between two ranks: sends are asynchronous, receives
    block. A receiving stage notes the transfer time (description and
    hidden rows, after the header) in the item's timings. host_staging:
    hidden rows on a GPU cross a gloo group through host memory."""

    def __init__(self, group, peer: int, num_stages: int, stage: int | None = None, hidden_size: int = 0,
                 dtype=None, device=None, host_staging: bool = False):
        self.group, self.peer, self.num_stages, self.stage = group, peer, num_stages, stage
        self.hidden_size, self.dtype, self.device = hidden_size, dtype, device
        self.host_staging = host_staging
        self._outstanding: deque[tuple[object, torch.Tensor]] = deque()

    def send(self, item: Item) -> None:
        import torch.distributed as dist

        header, desc = _pack(item, self.num_stages)
        hidden = item.hidden.cpu() if self.host_staging and item.hidden is not None else item.hidden
        for t in (header, desc, hidden):
            if t is not None:
                t = t.contiguous()
                self._outstanding.append((dist.isend(t, self.peer, group=self.group), t))
        while self._outstanding and (self._outstanding[0][0].is_completed()
                                     or len(self._outstanding) > _MAX_OUTSTANDING):
            self._outstanding.popleft()[0].wait()

    def recv(self) -> Item:
        import torch.distributed as dist

        header = torch.empty(HEADER_BYTES, dtype=torch.uint8)
        dist.recv(header, self.peer, group=self.group)
        t0 = time.perf_counter_ns()
        item, rows, follows = _unpack(header, self.num_stages)
        if follows:
            buf = torch.empty(follows, dtype=torch.uint8)
            dist.recv(buf, self.peer, group=self.group)
            item.desc = buf.numpy().tobytes()
        if rows:
            hidden = torch.empty((rows, self.hidden_size), dtype=self.dtype,
                                 device="cpu" if self.host_staging else self.device)
            dist.recv(hidden, self.peer, group=self.group)
            item.hidden = hidden.to(self.device)
        if self.stage is not None:
            item.timings[2 * self.stage + 1] = time.perf_counter_ns() - t0
        return item

    def flush(self) -> None:
        while self._outstanding:
            self._outstanding.popleft()[0].wait()


class Fanout:
    """Items from a stage's TP rank 0 to its TP peers (a broadcast; the
    peers embed the tokens themselves, so no hidden rows travel)."""

    def __init__(self, group, root: int, num_stages: int):
        self.group, self.root, self.num_stages = group, root, num_stages

    def send(self, item: Item) -> None:
        import torch.distributed as dist

        header, desc = _pack(item, self.num_stages)
        dist.broadcast(header, self.root, group=self.group)
        if desc is not None:
            dist.broadcast(desc, self.root, group=self.group)

    def recv(self) -> Item:
        import torch.distributed as dist

        header = torch.empty(HEADER_BYTES, dtype=torch.uint8)
        dist.broadcast(header, self.root, group=self.group)
        item, _, follows = _unpack(header, self.num_stages)
        if follows:
            buf = torch.empty(follows, dtype=torch.uint8)
            dist.broadcast(buf, self.root, group=self.group)
            item.desc = buf.numpy().tobytes()
        return item
