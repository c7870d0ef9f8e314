"""Measure step times for the scheduler's cost model.

Prefill time per prompt length, decode time per (batch size, context length).
Timing does not depend on the KV values, so decode points run straight on
whatever the blocks hold instead of prefilling first."""
from __future__ import annotations

import time

from fastserve.gpu_worker.batch import SeqWork
from fastserve.common.sampling_params import SamplingParams

PREFILL_LENS = (16, 32, 64, 128, 256, 512, 1024)
DECODE_BATCHES = (1, 2, 4, 8, 16, 32)
DECODE_CONTEXTS = (64, 256, 1024)
_GREEDY = SamplingParams(temperature=0.0, max_tokens=1)


def _sync(engine) -> None:
    if engine.device.type == "cuda":
        import torch

        torch.cuda.synchronize(engine.device)


def _time(engine, work, repeats: int) -> float:
    engine.step(work)  # warm-up
    times = []
    for _ in range(repeats):
        _sync(engine)
        t0 = time.perf_counter()
        engine.step(work)
        _sync(engine)
        times.append(time.perf_counter() - t0)
    # The fastest run: on a machine shared with other work the slow runs
    # measure the neighbours, not the model.
    return min(times)


def _tables(engine, num_seqs: int, tokens: int) -> list[list[int]] | None:
    per = -(-tokens // engine.block_size)
    if num_seqs * per > engine.num_gpu_blocks:
        return None
    return [list(range(i * per, (i + 1) * per)) for i in range(num_seqs)]


def profile_engine(engine, quick: bool = False, repeats: int = 3) -> dict:
    max_len = engine.model_config.max_model_len
    prefill_lens = [n for n in PREFILL_LENS if n <= max_len][: 4 if quick else None]
    batches = DECODE_BATCHES[::2] if quick else DECODE_BATCHES
    contexts = [c for c in DECODE_CONTEXTS if c <= max_len][: 2 if quick else None]
    prefill = []
    for n in prefill_lens:
        tables = _tables(engine, 1, n)
        if tables is None:
            continue
        work = [SeqWork("p", [1] * n, 0, tables[0], _GREEDY)]
        prefill.append({"tokens": n, "seconds": _time(engine, work, repeats)})
    decode = []
    for b in batches:
        for c in contexts:
            tables = _tables(engine, b, c)
            if tables is None:
                continue
            work = [SeqWork(f"d{i}", [1], c - 1, tables[i], _GREEDY) for i in range(b)]
            decode.append({"batch_size": b, "context_len": c, "seconds": _time(engine, work, repeats)})
    device = str(engine.device)
    if engine.device.type == "cuda":
        import torch

        device = f"{device} ({torch.cuda.get_device_name(engine.device)})"
    return {"model": str(engine.model_dir), "device": device, "block_size": engine.block_size,
            "prefill": prefill, "decode": decode}
