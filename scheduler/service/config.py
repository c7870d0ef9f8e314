"""The scheduler service's configuration, and the core it builds from it once
the worker's heartbeat has said how large the worker's KV pool is."""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from fastserve.scheduler.service.job_table import WorkerInfo


@dataclass
class SchedulerServiceConfig:
    replica: str = "default"
    instance_id: str = ""
    model: str = "fastserve"  # served model name, reported in stats
    policy: str = "default"
    kv_policy: str = "proactive"
    max_batch_size: int = 32
    max_tokens_per_batch: int = 2048
    gpu_kv_blocks: int | None = None  # None: every block the worker has
    host_kv_blocks: int = 0
    profile: str | None = None  # JSON from `fastserve profile`; None: the default cost model
    max_queued_jobs: int = 0  # 0: unlimited; else stop taking jobs from the shared queue
    heartbeat_interval: float = 1.0
    stats_interval: float = 0.5
    result_timeout: float = 600.0  # no batch result this long: the batch failed
    worker_timeout: float = 10.0  # no worker heartbeat this long while a batch runs: the worker is gone
    worker_wait: float = 300.0  # how long start() waits for the worker's first heartbeat
    # Batches in flight at once. 1: schedule -> result -> schedule. More keeps
    # the worker's queue full while results travel (the core leaves jobs of
    # outstanding batches out, so on one stage consecutive batches hold
    # different jobs): for pipelines of several stages, or to hide the bus.
    pipeline_depth: int = 1
    core_options: dict = field(default_factory=dict)  # extra SchedulerCoreConfig fields

    def __post_init__(self) -> None:
        if not self.instance_id:
            self.instance_id = f"scheduler-{self.replica}-{uuid.uuid4().hex[:6]}"
        for name in ("max_batch_size", "max_tokens_per_batch", "heartbeat_interval", "stats_interval",
                     "result_timeout", "worker_timeout", "pipeline_depth"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.gpu_kv_blocks is not None and self.gpu_kv_blocks <= 0:
            raise ValueError(f"gpu_kv_blocks must be > 0, got {self.gpu_kv_blocks}")
        if self.host_kv_blocks < 0 or self.max_queued_jobs < 0:
            raise ValueError("host_kv_blocks and max_queued_jobs must be >= 0")


def build_core(config: SchedulerServiceConfig, worker: WorkerInfo):
    """The SchedulerCore for this replica, sized by what the worker has."""
    from fastserve.scheduler.core.placement import make_kv_policy
    from fastserve.scheduler.core.config import SchedulerCoreConfig
    from fastserve.scheduler.core.scheduler import SchedulerCore
    from fastserve.scheduler.core.cost_model import CostModel

    num_gpu = min(config.gpu_kv_blocks or worker.num_gpu_blocks, worker.num_gpu_blocks)
    cost = CostModel.from_profile(config.profile) if config.profile else CostModel.default(worker.block_size)
    core_cfg = SchedulerCoreConfig(
        policy=config.policy, max_batch_size=config.max_batch_size,
        max_tokens_per_batch=config.max_tokens_per_batch, block_size=worker.block_size,
        num_gpu_blocks=num_gpu, num_host_blocks=config.host_kv_blocks, max_model_len=worker.max_model_len,
        **config.core_options)
    kv_policy = make_kv_policy(config.kv_policy)
    return SchedulerCore(core_cfg, cost, kv_policy), num_gpu
