"""Workloads for the simulator (and the load generator): JSONL traces,
synthetic lognormal lengths matched to published dataset statistics (the
presets below, and the request-family mixes of mixes.py), with Poisson or
Gamma arrivals."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastserve.scheduler.sim.mixes import MIXES, sample_mix

MAX_INPUT = 1024
MAX_TOTAL = 2048


@dataclass(frozen=True)
class TraceJob:
    arrival_time: float
    input_len: int
    output_len: int


@dataclass(frozen=True)
class Preset:
    input_mean: float
    input_cv: float
    output_mean: float


# ShareGPT-like and Alpaca-like: the means DESIGN.md gives. `longprompt`: the
# long-prompt / short-output mix for the skip-join ablation (prompts spread over
# 1..1024 tokens, mostly long; short answers).
PRESETS = {
    "sharegpt": Preset(161, 1.0, 338),
    "alpaca": Preset(19, 1.0, 58),
    "longprompt": Preset(512, 1.0, 32),
}


class TraceError(ValueError):
    pass


def lognormal(rng: np.random.Generator, mean: float, cv: float, n: int) -> np.ndarray:
    """Lognormal samples with the given mean and coefficient of variation."""
    if cv <= 0:
        return np.full(n, mean)
    sigma2 = math.log(1 + cv * cv)
    return rng.lognormal(math.log(mean) - sigma2 / 2, math.sqrt(sigma2), n)


def arrivals(rng: np.random.Generator, n: int, rate: float, cv: float = 1.0) -> list[float]:
    """Arrival times with mean rate `rate`: Gamma inter-arrival gaps with the
    given CV (cv=1: Poisson)."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if cv <= 0:
        gaps = np.full(n, 1.0 / rate)
    else:
        shape = 1.0 / (cv * cv)
        gaps = rng.gamma(shape, 1.0 / (rate * shape), n)
    return np.cumsum(gaps).tolist()


NAMES = (*PRESETS, *MIXES)


def synthetic(name: str, num_jobs: int, rate: float, *, cv: float | None = None, seed: int = 0,
              arrival_cv: float = 1.0) -> list[TraceJob]:
    """`cv`: coefficient of variation of a preset's output lengths (default 1;
    heavy tails: 2). A mix's families have their own, so it takes none."""
    if name not in NAMES:
        raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(NAMES)} or a .jsonl path")
    if num_jobs < 1:
        raise ValueError(f"num_jobs must be >= 1, got {num_jobs}")
    if (cv is not None and cv < 0) or arrival_cv < 0:
        raise ValueError("cv and arrival_cv must be >= 0")
    rng = np.random.default_rng(seed)
    if name in MIXES:
        if cv is not None:
            raise ValueError(f"workload {name} is a mix of request families with their own length "
                             f"distributions; --cv applies to {', '.join(PRESETS)} only")
        inputs, outputs = sample_mix(rng, name, num_jobs, MAX_TOTAL)
        times = arrivals(rng, num_jobs, rate, arrival_cv)
        return [TraceJob(t, int(i), int(o)) for t, i, o in zip(times, inputs, outputs)]
    cv = 1.0 if cv is None else cv
    p = PRESETS[name]
    inputs = np.clip(np.rint(lognormal(rng, p.input_mean, p.input_cv, num_jobs)), 1, MAX_INPUT).astype(int)
    outputs = np.rint(lognormal(rng, p.output_mean, cv, num_jobs)).astype(int)
    outputs = np.clip(outputs, 1, MAX_TOTAL - inputs)
    times = arrivals(rng, num_jobs, rate, arrival_cv)
    return [TraceJob(t, int(i), int(o)) for t, i, o in zip(times, inputs, outputs)]


def load_trace(path: str | Path, *, rate: float | None = None, seed: int = 0, arrival_cv: float = 1.0,
               num_jobs: int | None = None) -> list[TraceJob]:
    """JSONL, one job per line: {"arrival_time": s (optional), "input_len": n, "output_len": n}.
    Without arrival_time on every line, arrivals are generated at `rate`."""
    rows: list[tuple[float | None, int, int]] = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise TraceError(f"cannot read trace {path}: {exc}") from exc
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{where}: not JSON: {exc.msg}") from exc
        if not isinstance(obj, dict):
            raise TraceError(f"{where}: expected a JSON object")
        try:
            inp, out = obj["input_len"], obj["output_len"]
        except KeyError as exc:
            raise TraceError(f"{where}: missing field {exc.args[0]!r}") from exc
        at = obj.get("arrival_time")
        for name, v in (("input_len", inp), ("output_len", out)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise TraceError(f"{where}: {name} must be a positive integer, got {v!r}")
        if at is not None and (not isinstance(at, (int, float)) or isinstance(at, bool) or at < 0
                               or not math.isfinite(at)):
            raise TraceError(f"{where}: arrival_time must be a number >= 0, got {at!r}")
        if inp + out > MAX_TOTAL:
            raise TraceError(f"{where}: input_len + output_len = {inp + out} exceeds {MAX_TOTAL}")
        rows.append((at, inp, out))
        if num_jobs is not None and len(rows) >= num_jobs:
            break
    if not rows:
        raise TraceError(f"{path}: no jobs in trace")
    if all(r[0] is not None for r in rows):
        jobs = [TraceJob(float(a), i, o) for a, i, o in rows]  # type: ignore[arg-type]
    else:
        if rate is None:
            raise TraceError(f"{path}: some lines lack arrival_time; give --rate to generate arrivals")
        times = arrivals(np.random.default_rng(seed), len(rows), rate, arrival_cv)
        jobs = [TraceJob(t, i, o) for t, (_, i, o) in zip(times, rows)]
    return sorted(jobs, key=lambda j: j.arrival_time)


def make_workload(spec: str, *, num_jobs: int, rate: float | None, cv: float | None = None, seed: int = 0,
                  arrival_cv: float = 1.0) -> list[TraceJob]:
    if spec in NAMES:
        if rate is None:
            raise ValueError(f"workload {spec} needs --rate")
        return synthetic(spec, num_jobs, rate, cv=cv, seed=seed, arrival_cv=arrival_cv)
    if spec.endswith(".jsonl") or Path(spec).exists():
        return load_trace(spec, rate=rate, seed=seed, arrival_cv=arrival_cv, num_jobs=num_jobs)
    raise ValueError(f"unknown workload {spec!r}; choose one of {', '.join(NAMES)} or a .jsonl path")


def write_trace(jobs: list[TraceJob], path: str | Path) -> None:
    with open(path, "w") as f:
        for j in jobs:
            f.write(json.dumps({"arrival_time": j.arrival_time, "input_len": j.input_len,
                                "output_len": j.output_len}) + "\n")
