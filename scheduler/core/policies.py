"""Job-ordering policies behind one interface. A policy decides which level
(queue) a job joins, its sort key inside the level (smaller runs first), each
level's quantum, and whether starving jobs are promoted; the hooks at the end
let a policy learn from arrivals and completions and hold a prefill back. The
core does the rest."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Sequence

from fastserve.common.settings import POLICIES
from fastserve.scheduler.core.cost_model import CostModel

if TYPE_CHECKING:
    from fastserve.scheduler.core.job import Job

# `default` names the policy `fastserve up` runs: DEFAULT_POLICY.
DEFAULT_POLICY = "gittins"
POLICY_NAMES = POLICIES  # defined once, in common/settings.py


@dataclass
class Policy:
    name: str
    quanta: tuple[float, ...]  # one per level; math.inf: never demoted out
    starvation: bool
    skip_join: bool = False
    cost_model: CostModel | None = None
    # Keys that change as a job runs: the core re-sorts a job after each of
    # its iterations when its key changed.
    rekey: ClassVar[bool] = False
    # Multiplies the core's starvation threshold for this policy.
    starvation_patience: ClassVar[float] = 1.0

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

    def key(self, job: Job) -> tuple:
        """Sort key inside the job's level; job.seq counts up as jobs enter levels."""
        return (job.seq,)

    def arrive(self, job: Job, now: float) -> None:
        """A job was added (after its key was set)."""

    def observe(self, job: Job) -> None:
        """A job finished: its output length is known now."""

    def defer_prefill(self, job: Job, tokens: int, batch: Sequence[tuple[Job, int]], waiting: int) -> bool:
        """Whether to keep `tokens` prompt tokens of `job` out of this iteration,
        whose batch so far is `batch` ((job, new tokens) in priority order);
        `waiting`: jobs that have not run yet."""
        return False


class SRPT(Policy):
    """Oracle of remaining output tokens (knows the output length)."""

    rekey = True

    def key(self, job: Job) -> tuple:
        return (job.remaining_tokens, job.seq)


def make_policy(name: str, *, cost_model: CostModel, base_quantum: float, num_queues: int = 10,
                quantum_ratio: float = 2.0, max_batch_size: int = 32, max_model_len: int = 2048) -> Policy:
    if base_quantum <= 0 or quantum_ratio < 1 or num_queues < 1:
        raise ValueError(f"bad MLFQ parameters: base_quantum={base_quantum}, "
                         f"quantum_ratio={quantum_ratio}, num_queues={num_queues}")
    if name == "default":
        name = DEFAULT_POLICY
    mlfq_quanta = tuple(base_quantum * quantum_ratio ** i for i in range(num_queues - 1)) + (math.inf,)
    if name == "sj-mlfq":
        return Policy(name, mlfq_quanta, starvation=True, skip_join=True, cost_model=cost_model)
    if name == "mlfq":
        return Policy(name, mlfq_quanta, starvation=True, cost_model=cost_model)
    if name == "fcfs":
        return Policy(name, (math.inf,), starvation=False, cost_model=cost_model)
    if name == "srpt":
        return SRPT(name, (math.inf,), starvation=False, cost_model=cost_model)
    if name in ("gittins", "oracle"):
        from fastserve.scheduler.core.index_policies import GittinsPolicy, OraclePolicy

        cls = GittinsPolicy if name == "gittins" else OraclePolicy
        return cls.build(cost_model=cost_model, base_quantum=base_quantum, max_batch_size=max_batch_size,
                         max_model_len=max_model_len)
    raise ValueError(f"unknown scheduling policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
