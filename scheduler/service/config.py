"""The scheduler service's configuration, and the core it builds from it once
the worker's heartbeat has said how large the worker's KV pool is."""
from __future__ import annotations

import uuid
from dataclasses import dataclass

from fastserve.common import settings as S
from fastserve.common.schemas import WorkerInfo


@dataclass
class SchedulerServiceConfig:
    replica: str = S.REPLICA()
    instance_id: str = S.INSTANCE_ID()
    served_model_name: str | None = S.SERVED_MODEL_NAME()  # reported in stats
    policy: str = S.POLICY()
    kv_policy: str = S.KV_POLICY()
    max_batch_size: int = S.MAX_BATCH_SIZE()
    max_tokens_per_batch: int = S.MAX_TOKENS_PER_BATCH()
    gpu_kv_blocks: int | None = S.GPU_KV_BLOCKS()  # None: every block the worker has
    num_queues: int = S.NUM_QUEUES()
    quantum_ratio: float = S.QUANTUM_RATIO()
    base_quantum: float | None = S.BASE_QUANTUM()
    starvation_threshold: float | None = S.STARVATION_THRESHOLD()
    watermark: float = S.WATERMARK()
    reserve: float = S.RESERVE()
    profile: str | None = S.PROFILE()
    max_queued_jobs: int = S.MAX_QUEUED_JOBS()
    max_batches_in_flight: int = S.MAX_BATCHES_IN_FLIGHT()
    heartbeat_interval: float = S.HEARTBEAT_INTERVAL()
    worker_timeout: float = S.WORKER_TIMEOUT()
    worker_grace: float = S.WORKER_GRACE()
    kvstore_timeout: float = S.KVSTORE_TIMEOUT()
    stats_interval: float = 0.5
    # Seconds between the dashboard's SchedulerSnapshots (0: none are sent).
    snapshot_interval: float = 0.25
    worker_wait: float = 300.0  # how long start() waits for the first worker before giving up

    def __post_init__(self) -> None:
        if not self.instance_id:
            self.instance_id = f"scheduler-{self.replica}-{uuid.uuid4().hex[:6]}"
        S.validate(self)

    @property
    def uses_host_kv(self) -> bool:
        return self.kv_policy in ("proactive", "reactive")

    def batches_in_flight(self, worker: WorkerInfo) -> int:
        """A pipeline of P stages needs P batches in it, and one more queued
        at its door so the first stage never waits for the scheduler."""
        if worker.pipeline_parallel_size > 1:
            return max(self.max_batches_in_flight, worker.pipeline_parallel_size + 1)
        return self.max_batches_in_flight


def build_core(config: SchedulerServiceConfig, worker: WorkerInfo):
    """The SchedulerCore for this replica, sized by what the worker has (the
    host pool counts 0 blocks until a KV store says how many it offers)."""
    from fastserve.scheduler.core.config import SchedulerCoreConfig
    from fastserve.scheduler.core.cost_model import CostModel
    from fastserve.scheduler.core.placement import make_kv_policy
    from fastserve.scheduler.core.scheduler import SchedulerCore

    num_gpu = min(config.gpu_kv_blocks or worker.num_gpu_blocks, worker.num_gpu_blocks)
    # On a pipeline of P stages a job's next token comes back from the last
    # stage P iterations later: it runs in every P-th batch, P batches apart.
    gap = worker.pipeline_parallel_size
    cost = CostModel.from_profile(config.profile) if config.profile else CostModel.default(worker.block_size)
    # A job is charged one stage's time per iteration (the worker reports the
    # slowest stage): quanta and skip-join must be in the same unit.
    cost = cost.per_stage(worker.pipeline_parallel_size)
    core_cfg = SchedulerCoreConfig(
        policy=config.policy, max_batch_size=config.max_batch_size,
        max_tokens_per_batch=config.max_tokens_per_batch, block_size=worker.block_size,
        num_gpu_blocks=num_gpu, num_host_blocks=0, max_model_len=worker.max_model_len,
        num_queues=config.num_queues, quantum_ratio=config.quantum_ratio, base_quantum=config.base_quantum,
        starvation_threshold=config.starvation_threshold, reschedule_gap=gap)
    kv_policy = make_kv_policy(config.kv_policy, watermark=config.watermark, reserve=config.reserve)
    return SchedulerCore(core_cfg, cost, kv_policy), num_gpu
