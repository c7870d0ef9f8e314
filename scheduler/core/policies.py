"""Job-ordering policies behind one interface. A policy decides which level
(queue) a job joins, its sort key inside the level (smaller runs first), each
level's quantum, and whether starving jobs are promoted. The core does the rest."""
from __future__ import annotations

from fastserve.common.settings import POLICIES

import math
from dataclasses import dataclass

from fastserve.scheduler.core.cost_model import CostModel

POLICY_NAMES = POLICIES  # defined once, in common/settings.py


@dataclass
class Policy:
    name: str
    quanta: tuple[float, ...]  # one per level; math.inf: never demoted out
    starvation: bool
    skip_join: bool = False
    oracle: bool = False  # srpt: key = remaining output tokens
    cost_model: CostModel | None = None

    @property
    def num_levels(self) -> int:
        return len(self.quanta)

    def join_level(self, input_len: int) -> int:
        if not self.skip_join:
            return 0
        assert self.cost_model is not None
        # Skip-join: the highest queue whose quantum covers the predicted prefill,
        # so a long prompt does not enter Q0 only to be demoted right after.
        t_init = self.cost_model.prefill_time(input_len)
        for i, q in enumerate(self.quanta):
            if q >= t_init:
                return i
        return self.num_levels - 1

    def key(self, seq: int, remaining_tokens: int) -> tuple[int, ...]:
        return (remaining_tokens, seq) if self.oracle else (seq,)


def make_policy(name: str, *, cost_model: CostModel, base_quantum: float,
                num_queues: int = 10, quantum_ratio: float = 2.0) -> Policy:
    if base_quantum <= 0 or quantum_ratio < 1 or num_queues < 1:
        raise ValueError(f"bad MLFQ parameters: base_quantum={base_quantum}, "
                         f"quantum_ratio={quantum_ratio}, num_queues={num_queues}")
    mlfq_quanta = tuple(base_quantum * quantum_ratio ** i for i in range(num_queues - 1)) + (math.inf,)
    if name == "sj-mlfq":
        return Policy(name, mlfq_quanta, starvation=True, skip_join=True, cost_model=cost_model)
    if name == "mlfq":
        return Policy(name, mlfq_quanta, starvation=True, cost_model=cost_model)
    if name == "fcfs":
        return Policy(name, (math.inf,), starvation=False, cost_model=cost_model)
    if name == "srpt":
        return Policy(name, (math.inf,), starvation=False, oracle=True, cost_model=cost_model)
    raise ValueError(f"unknown scheduling policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
