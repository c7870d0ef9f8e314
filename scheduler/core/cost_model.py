"""Iteration-time model: how long a prefill of T tokens and a decode step of B
jobs with context L take. Read from the JSON profile that `fastserve profile`
writes, or built in for the CPU `small` model shape so that the simulator runs
without the engine.

Profile format (fixed by the contracts):
  {"model": str, "device": str, "block_size": int,
   "prefill": [{"tokens": int, "seconds": float}, ...],
   "decode": [{"batch_size": int, "context_len": int, "seconds": float}, ...]}
Optional extra key: "bytes_per_block" (KV bytes of one block, all layers), used
to time offload/upload copies.
"""
from __future__ import annotations

import bisect
import dataclasses
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

# The `small` preset of gpu_worker/model_maker.py: hidden 512, 8 layers, 8 heads
# (head_dim 64), 2 KV heads, fp32. KV bytes per token = 2 (K,V) * 8 layers *
# 2 heads * 64 * 4 bytes = 8 KiB.
_SMALL_KV_BYTES_PER_TOKEN = 2 * 8 * 2 * 64 * 4

# The built-in profile: a fit to `fastserve profile` of the `small` preset
# (~28M parameters, fp32) on a 2-core CPU (benchmarks/results/small_cpu_profile.json,
# measured while other jobs shared the machine, so approximate): ~8 ms fixed
# per iteration, 0.36 ms per prompt token, a per-sequence quadratic attention
# term for prefill, and decode steps that batch well at short context but pay
# ~2 us per job per token of context. `--profile` replaces it.
_DEFAULT_OVERHEAD = 0.008
_DEFAULT_PREFILL_PER_TOKEN = 0.00036
_DEFAULT_PREFILL_ATTN = 0.03e-6  # * tokens^2
_DEFAULT_DECODE_PER_JOB = 0.0003
_DEFAULT_DECODE_ATTN = 2e-6  # * batch * context


def _default_profile(block_size: int = 16) -> dict[str, Any]:
    prefill = [
        {"tokens": t, "seconds": _DEFAULT_OVERHEAD + _DEFAULT_PREFILL_PER_TOKEN * t + _DEFAULT_PREFILL_ATTN * t * t}
        for t in (1, 16, 64, 128, 256, 512, 1024, 2048)
    ]
    decode = [
        {"batch_size": b, "context_len": c,
         "seconds": _DEFAULT_OVERHEAD + _DEFAULT_DECODE_PER_JOB * b + _DEFAULT_DECODE_ATTN * b * c}
        for b in (1, 2, 4, 8, 16, 32, 64) for c in (64, 256, 1024, 2048)
    ]
    return {"model": "small (built-in, fit to a 2-core CPU profile)", "device": "cpu", "block_size": block_size,
            "prefill": prefill, "decode": decode,
            "bytes_per_block": _SMALL_KV_BYTES_PER_TOKEN * block_size}


class ProfileError(ValueError):
    pass


@dataclass(frozen=True)
class CostModel:
    """prefill: piecewise-linear in tokens (linear extrapolation past the last
    point). decode: least-squares fit of a + b*B + c*B*L, which interpolates
    a sparse (batch, context) grid without holes."""

    prefill_tokens: tuple[float, ...]
    prefill_seconds: tuple[float, ...]
    decode_coef: tuple[float, float, float]
    block_size: int = 16
    bytes_per_block: int = _SMALL_KV_BYTES_PER_TOKEN * 16
    name: str = ""

    # -- construction -------------------------------------------------------
    @classmethod
    def default(cls, block_size: int = 16) -> "CostModel":
        return cls.from_dict(_default_profile(block_size))

    @classmethod
    def from_profile(cls, path: str | Path) -> "CostModel":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ProfileError(f"cannot read profile {path}: {exc}") from exc
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "profile") -> "CostModel":
        if not isinstance(data, dict):
            raise ProfileError(f"{source}: profile must be a JSON object")
        try:
            block_size = int(data["block_size"])
            pre = sorted((float(p["tokens"]), float(p["seconds"])) for p in data["prefill"])
            dec = [(float(p["batch_size"]), float(p["context_len"]), float(p["seconds"])) for p in data["decode"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ProfileError(f"{source}: bad profile field: {exc!r}") from exc
        if block_size < 1 or not pre or len(dec) < 1:
            raise ProfileError(f"{source}: need block_size >= 1, prefill and decode points")
        if any(t <= 0 or s <= 0 for t, s in pre) or any(b <= 0 or c < 0 or s <= 0 for b, c, s in dec):
            raise ProfileError(f"{source}: profile points must be positive")
        bpb = int(data.get("bytes_per_block") or _SMALL_KV_BYTES_PER_TOKEN * block_size)
        # A longer prompt never takes less time: measured points that say so
        # are noise (launch-bound GPU profiles are flat and jittery), and a
        # falling curve extrapolates to ~0 s for long prompts, which would
        # make skip-join put the longest prompts in Q0.
        seconds = list(itertools.accumulate((s for _, s in pre), max))
        return cls(
            prefill_tokens=tuple(t for t, _ in pre), prefill_seconds=tuple(seconds),
            decode_coef=_fit_decode(dec), block_size=block_size, bytes_per_block=bpb,
            name=str(data.get("model", source)),
        )

    # -- queries ------------------------------------------------------------
    def prefill_time(self, tokens: int) -> float:
        if tokens <= 0:
            return 0.0
        xs, ys = self.prefill_tokens, self.prefill_seconds
        if len(xs) == 1:
            return ys[0] * tokens / xs[0]
        i = bisect.bisect_left(xs, tokens)
        i = min(max(i, 1), len(xs) - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        t = y0 + (y1 - y0) * (tokens - x0) / (x1 - x0) if x1 != x0 else y1
        return max(t, 1e-6)

    def decode_time(self, batch_size: int, context_len: float) -> float:
        if batch_size <= 0:
            return 0.0
        a, b, c = self.decode_coef
        return max(a + b * batch_size + c * batch_size * context_len, 1e-6)

    @property
    def overhead(self) -> float:
        """Fixed per-iteration cost (the decode fit at B=0)."""
        return max(self.decode_coef[0], 0.0)

    def _prefill_marginal(self, tokens: int) -> float:
        """Prefill time without the per-iteration overhead (0 for 0 tokens)."""
        return max(self.prefill_time(tokens) - self.overhead, 0.0) if tokens > 0 else 0.0

    def iteration_time(self, batch: Sequence[Any]) -> float:
        """`batch`: BatchEntry-like objects (is_prefill, num_new_tokens, num_computed).
        One overhead per iteration; each prefill (or chunk) pays its own marginal
        cost, extending whatever context it already has (attention is
        quadratic per sequence, not in the batch's total); decodes pay their
        marginal cost at their mean context."""
        if not batch:
            return 0.0
        t = self.overhead
        n_dec = 0
        ctx = 0
        for e in batch:
            if e.is_prefill:
                c = e.num_computed
                t += self._prefill_marginal(c + e.num_new_tokens) - self._prefill_marginal(c)
            else:
                n_dec += 1
                ctx += e.num_computed + e.num_new_tokens
        if n_dec:
            t += self.decode_time(n_dec, ctx / n_dec) - self.overhead
        return t

    def per_stage(self, pipeline_parallel_size: int) -> "CostModel":
        """The cost of one of P balanced pipeline stages: what an iteration
        costs the pipeline's pace (and so what a job is charged per iteration)."""
        if pipeline_parallel_size == 1:
            return self
        f = 1.0 / pipeline_parallel_size
        return dataclasses.replace(self, prefill_seconds=tuple(x * f for x in self.prefill_seconds),
                                   decode_coef=tuple(x * f for x in self.decode_coef),
                                   name=f"{self.name} / {pipeline_parallel_size} stages")

    def copy_time(self, num_blocks: int, bandwidth: float) -> float:
        """Seconds to move num_blocks KV blocks at `bandwidth` bytes/s."""
        assert bandwidth > 0
        return num_blocks * self.bytes_per_block / bandwidth

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)


def _fit_decode(points: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    """Least squares of a + b*B + c*B*L with b, c >= 0 (time never shrinks
    with more work). Constrained, not clipped afterwards: on noisy points
    (a serving run's steps, where the machine's speed drifts while the batch
    size does) the free fit can make b negative, and zeroing b then leaves a
    and c fitted for the negative b: every prediction too high (by 40% on
    one CPU run's steps). With only two constrained terms, trying each set of
    them held at zero is the exact non-negative solution."""
    import numpy as np

    cols = np.array([[1.0, b, b * c] for b, c, _ in points])
    y = np.array([s for _, _, s in points])
    best: tuple[float, tuple[float, float, float]] | None = None
    for free in ((0, 1, 2), (0, 1), (0, 2), (0,)):
        sol, *_ = np.linalg.lstsq(cols[:, free], y, rcond=None)
        coef = [0.0, 0.0, 0.0]
        for i, v in zip(free, sol):
            coef[i] = float(v)
        if coef[1] < 0 or coef[2] < 0:
            continue
        sse = float(((cols @ np.array(coef) - y) ** 2).sum())
        if best is None or sse < best[0] - 1e-15:
            best = (sse, (coef[0], coef[1], coef[2]))
    assert best is not None  # the intercept-only fit is always feasible
    return best[1]
