"""Find, per policy, the highest arrival rate whose mean normalized latency
stays under the SLO (the paper's "throughput at the SLO")."""
from __future__ import annotations

from typing import Callable


def max_rate_at_slo(run: Callable[[float], dict], slo: float, start: float, *, factor: float = 1.5,
                    max_expand: int = 10, bisect_steps: int = 5) -> dict:
    """`run(rate) -> metrics`. Expand geometrically from `start` until the SLO
    is crossed, then bisect. Returns the best rate, its metrics and every point."""
    points: list[tuple[float, dict]] = []

    def ok(rate: float) -> bool:
        m = run(rate)
        points.append((rate, m))
        return m["mean_norm_latency"] <= slo

    lo, hi = None, None
    r = start
    if ok(r):
        lo = r
        for _ in range(max_expand):
            r *= factor
            if ok(r):
                lo = r
            else:
                hi = r
                break
    else:
        hi = r
        for _ in range(max_expand):
            r /= factor
            if ok(r):
                lo = r
                break
            hi = r
    if lo is not None and hi is not None:
        for _ in range(bisect_steps):
            mid = (lo + hi) / 2
            if ok(mid):
                lo = mid
            else:
                hi = mid
    best = dict(next(m for rate, m in points if rate == lo)) if lo is not None else None
    return {
        "max_rate_at_slo": lo or 0.0,
        "throughput_at_slo": best["throughput"] if best else 0.0,
        "mean_norm_latency_at_max_rate": best["mean_norm_latency"] if best else None,
        "points": sorted((rate, m["mean_norm_latency"]) for rate, m in points),
        "ttft_points": sorted((rate, m["mean_ttft"]) for rate, m in points),
        "saturated": hi is None,  # never crossed the SLO within the search
    }
