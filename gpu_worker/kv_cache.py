"""The paged KV cache: a device pool of fixed-size blocks (all layers per
block id) and a host pool the blocks can be copied out to and back from.

Device layout: (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim),
so each layer's K and V are one contiguous tensor to gather from.
Host layout: (num_host_blocks, num_layers, 2, block_size, num_kv_heads,
head_dim), so each host block is one contiguous run of `bytes_per_block`
bytes: a shared-memory KV store can hand out blocks by offset. A rank of a
split replica (common/model_split.py) owns one chunk of each block of a
shared buffer: `host_chunk=(offset, block_stride)` in bytes."""
from __future__ import annotations

import weakref

import torch


def _pin(t: torch.Tensor) -> bool:
    """Page-lock an external host buffer so device copies can be asynchronous.
    If the driver refuses, copies stay correct but synchronous."""
    err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 1)  # portable
    if int(err) != 0:
        _consume_cuda_error(t.device if t.is_cuda else torch.device("cuda"))
        return False
    return True


def _consume_cuda_error(device) -> None:
    """A failed runtime call leaves its error to be reported by torch's next
    kernel-launch check; take it here instead of failing unrelated work."""
    get_last = getattr(torch.cuda.cudart(), "cudaGetLastError", None)
    if get_last is not None:
        get_last()
        return
    try:
        torch.zeros(1, device=device).add_(1)
        torch.cuda.synchronize(device)
    except RuntimeError:
        pass


def _unpin(ptr: int) -> None:
    if int(torch.cuda.cudart().cudaHostUnregister(ptr)) != 0:
        _consume_cuda_error(torch.device("cuda"))


class CopyHandle:
    """A block copy in flight. On CUDA it completes on a side stream; on the
    CPU it is done when returned."""

    def __init__(self, event=None, keep_alive=()):
        self._event = event
        self._keep_alive = keep_alive  # staging tensors the copy still reads/writes

    def done(self) -> bool:
        if self._event is None or self._event.query():
            self._keep_alive = ()
            return True
        return False

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()
        self._keep_alive = ()


def _runs(ids: list[int]) -> list[tuple[int, int, int]]:
    """(position in ids, first id, length) of each run of consecutive ids."""
    runs = []
    i = 0
    while i < len(ids):
        j = i + 1
        while j < len(ids) and ids[j] == ids[j - 1] + 1:
            j += 1
        runs.append((i, ids[i], j - i))
        i = j
    return runs


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                 num_blocks: int, num_host_blocks: int, dtype: torch.dtype, device, host_buffer=None,
                 host_chunk: tuple[int, int] | None = None):
        self.device = torch.device(device)
        self.dtype = dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        block_shape = (num_layers, 2, block_size, num_kv_heads, head_dim)
        self._block_shape = block_shape
        self.block_numel = num_layers * 2 * block_size * num_kv_heads * head_dim
        self.bytes_per_block = self.block_numel * torch.empty((), dtype=dtype).element_size()
        self.gpu = torch.zeros((num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim),
                               dtype=dtype, device=self.device)
        self.on_cuda = self.device.type == "cuda"
        self.host_chunk = host_chunk
        self.set_host_buffer(host_buffer, num_host_blocks)
        self.copy_stream = torch.cuda.Stream(self.device) if self.on_cuda else None
        self._pending: list[CopyHandle] = []

    def set_host_buffer(self, host_buffer, num_host_blocks: int = 0) -> None:
        """Use another host pool (a restarted KV store's new one). The caller
        makes sure no copy to or from the old one is running."""
        self.host = self._host_pool(self._block_shape, num_host_blocks, host_buffer, self.host_chunk)
        # Runs of consecutive host blocks are one copy only where blocks are adjacent.
        self.host_runs = self.host.is_contiguous()
        self.num_host_blocks = self.host.shape[0]

    def _host_pool(self, block_shape, num_host_blocks: int, host_buffer, host_chunk) -> torch.Tensor:
        self.host_pinned = False
        if host_buffer is None:
            pin = self.device.type == "cuda" and torch.cuda.is_available()
            self.host_pinned = pin
            return torch.zeros((num_host_blocks, *block_shape), dtype=self.dtype, pin_memory=pin)
        if isinstance(host_buffer, torch.Tensor):
            flat = host_buffer.view(-1).view(torch.uint8) if host_buffer.dtype != torch.uint8 else host_buffer.view(-1)
        else:  # bytes-like: mmap, shared memory buffer, bytearray, numpy array
            flat = torch.frombuffer(memoryview(host_buffer).cast("B"), dtype=torch.uint8)
        offset, stride = host_chunk or (0, self.bytes_per_block)
        assert 0 <= offset and offset + self.bytes_per_block <= stride, (offset, stride, self.bytes_per_block)
        n = flat.numel() // stride
        if num_host_blocks:
            if num_host_blocks > n:
                raise ValueError(f"host_kv_buffer holds {n} blocks of {stride} bytes, "
                                 f"fewer than num_host_blocks={num_host_blocks}")
            n = num_host_blocks
        span = flat[: n * stride]
        rows = span.view(n, stride)[:, offset:offset + self.bytes_per_block]
        pool = rows.view(self.dtype).view(n, *block_shape)
        if self.device.type == "cuda" and n and not span.is_pinned():
            self.host_pinned = _pin(span)
            if self.host_pinned:
                weakref.finalize(span, _unpin, span.data_ptr())
        return pool

    def check_copy(self, gpu_blocks: list[int], host_blocks: list[int]) -> None:
        if len(gpu_blocks) != len(host_blocks):
            raise ValueError(f"{len(gpu_blocks)} GPU blocks but {len(host_blocks)} host blocks")
        if any(not 0 <= b < self.num_blocks for b in gpu_blocks):
            raise ValueError(f"GPU block id out of range [0, {self.num_blocks}): {gpu_blocks}")
        if any(not 0 <= b < self.num_host_blocks for b in host_blocks):
            raise ValueError(f"host block id out of range [0, {self.num_host_blocks}): {host_blocks}")

    def copy_out(self, gpu_blocks: list[int], host_blocks: list[int]) -> CopyHandle:
        self.check_copy(gpu_blocks, host_blocks)
        if not gpu_blocks:
            return CopyHandle()
        idx = torch.tensor(gpu_blocks, device=self.device)
        if not self.on_cuda:
            self.host[torch.tensor(host_blocks)] = self.gpu[:, :, idx].movedim(2, 0)
            return CopyHandle()
        stream = self.copy_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))  # the KV written so far
        with torch.cuda.stream(stream):
            staging = self.gpu[:, :, idx].movedim(2, 0).contiguous()
            for pos, first, n in self._runs(host_blocks):
                self.host[first:first + n].copy_(staging[pos:pos + n], non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        return self._track(CopyHandle(event, (staging, idx)))

    def copy_in(self, host_blocks: list[int], gpu_blocks: list[int]) -> CopyHandle:
        self.check_copy(gpu_blocks, host_blocks)
        if not gpu_blocks:
            return CopyHandle()
        idx = torch.tensor(gpu_blocks, device=self.device)
        if not self.on_cuda:
            self.gpu[:, :, idx] = self.host[torch.tensor(host_blocks)].movedim(0, 2)
            return CopyHandle()
        stream = self.copy_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))  # earlier reads of those blocks
        with torch.cuda.stream(stream):
            staging = torch.empty((len(host_blocks), *self.host.shape[1:]), dtype=self.dtype, device=self.device)
            for pos, first, n in self._runs(host_blocks):
                staging[pos:pos + n].copy_(self.host[first:first + n], non_blocking=True)
            self.gpu[:, :, idx] = staging.movedim(0, 2)
            event = torch.cuda.Event()
            event.record(stream)
        return self._track(CopyHandle(event, (staging, idx)))

    def _runs(self, host_blocks: list[int]) -> list[tuple[int, int, int]]:
        if self.host_runs:
            return _runs(host_blocks)
        return [(i, b, 1) for i, b in enumerate(host_blocks)]

    def _track(self, handle: CopyHandle) -> CopyHandle:
        self._pending = [h for h in self._pending if not h.done()]
        self._pending.append(handle)
        return handle

    def order_compute_after_copies(self) -> None:
        """Make the compute stream wait (on the device, without blocking the
        host) for every copy issued so far: a step never reads a block whose
        copy_in is still running, nor overwrites one a copy_out still reads."""
        if not self.on_cuda:
            return
        self._pending = [h for h in self._pending if not h.done()]
        current = torch.cuda.current_stream(self.device)
        for h in self._pending:
            current.wait_event(h._event)
