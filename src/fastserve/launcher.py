"""`fastserve up` (every service in one process) and `fastserve scheduler|worker|kvstore`
(one service per process).

`fastserve up` with no flags runs gateway, scheduler, worker and KV store in one
process on the in-memory bus, with a `small` random-weight model made on first
run. `--broker amqp://...` puts the same services on RabbitMQ; the per-service
commands take the same flags so a deployment can run them apart (deploy/).
Every flag is also read from the environment: `--max-batch-size` <->
`FASTSERVE_MAX_BATCH_SIZE`.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog

from fastserve.common import settings as S
from fastserve.common.config import ConfigError, add_config_args, config_from_args

log = structlog.get_logger("fastserve.launcher")

@dataclass
class NodeConfig:
    """The flags of `fastserve up` and of the per-service commands: every
    setting of every service (common/settings.py), handed to each service's
    own config by name (`pick`)."""

    model: str | None = S.MODEL()
    model_cache: str = S.MODEL_CACHE()
    served_model_name: str | None = S.SERVED_MODEL_NAME()
    broker: str = S.BROKER()
    namespace: str = S.NAMESPACE()
    replica: str = S.REPLICA()
    instance_id: str = S.INSTANCE_ID()
    host: str = S.HOST()
    port: int = S.PORT()
    api_key: str | None = S.API_KEY()
    policy: Literal[S.POLICIES] = S.POLICY()
    kv_policy: Literal[S.KV_POLICIES] = S.KV_POLICY()
    max_batch_size: int = S.MAX_BATCH_SIZE()
    max_tokens_per_batch: int = S.MAX_TOKENS_PER_BATCH()
    max_batches_in_flight: int = S.MAX_BATCHES_IN_FLIGHT()
    max_queued_jobs: int = S.MAX_QUEUED_JOBS()
    num_queues: int = S.NUM_QUEUES()
    quantum_ratio: float = S.QUANTUM_RATIO()
    base_quantum: float | None = S.BASE_QUANTUM()
    starvation_threshold: float | None = S.STARVATION_THRESHOLD()
    watermark: float = S.WATERMARK()
    reserve: float = S.RESERVE()
    profile: str | None = S.PROFILE()
    block_size: int = S.BLOCK_SIZE()
    gpu_kv_blocks: int | None = S.GPU_KV_BLOCKS()
    host_kv_blocks: int = S.HOST_KV_BLOCKS()
    host_kv_dir: str | None = S.HOST_KV_DIR()
    pipeline_parallel_size: int = S.PIPELINE_PARALLEL_SIZE()
    tensor_parallel_size: int = S.TENSOR_PARALLEL_SIZE()
    rank: int = S.RANK()
    dist_init: str | None = S.DIST_INIT()
    layer_split: tuple[int, ...] | None = S.LAYER_SPLIT()
    dist_timeout: float = S.DIST_TIMEOUT()
    max_copies_in_flight: int = S.MAX_COPIES_IN_FLIGHT()
    copy_timeout: float = S.COPY_TIMEOUT()
    device: str = S.DEVICE()
    dtype: Literal[S.DTYPES] = S.DTYPE()
    heartbeat_interval: float = S.HEARTBEAT_INTERVAL()
    worker_timeout: float = S.WORKER_TIMEOUT()
    worker_grace: float = S.WORKER_GRACE()
    kvstore_timeout: float = S.KVSTORE_TIMEOUT()
    health_timeout: float = S.HEALTH_TIMEOUT()
    request_timeout: float = S.REQUEST_TIMEOUT()
    queue_timeout: float = S.QUEUE_TIMEOUT()
    database: str = S.DATABASE()
    queue_concurrency: int = S.QUEUE_CONCURRENCY()
    result_retention: float = S.RESULT_RETENTION()
    log_level: str = S.LOG_LEVEL()

    def __post_init__(self) -> None:
        S.validate(self)
        if self.rank >= self.world_size:
            raise ValueError(f"rank {self.rank} is outside a replica of {self.world_size} ranks "
                             f"(--pipeline-parallel-size x --tensor-parallel-size)")
        if self.kv_policy in ("proactive", "reactive") and self.host_kv_blocks == 0:
            raise ValueError(f"kv_policy {self.kv_policy} moves KV to host memory: give --host-kv-blocks > 0 "
                             f"or use --kv-policy recompute|none")

    @property
    def world_size(self) -> int:
        return self.pipeline_parallel_size * self.tensor_parallel_size

    @property
    def host_kv_enabled(self) -> bool:
        return self.host_kv_blocks > 0 and self.kv_policy in ("proactive", "reactive")

    def model_name(self) -> str:
        return self.served_model_name or (Path(self.model).resolve().name if self.model else "fastserve")

    # ------------------------------------------------------------------ per-service configs
    def scheduler_config(self, **kw):
        from fastserve.scheduler.service.config import SchedulerServiceConfig

        return pick(SchedulerServiceConfig, self, served_model_name=self.model_name(),
                    instance_id=self._instance("scheduler"), **kw)

    def worker_config(self, **kw):
        from fastserve.gpu_worker.service import WorkerServiceConfig

        return pick(WorkerServiceConfig, self, model=self._need_model(), instance_id=self._instance("worker"), **kw)

    def kvstore_config(self, **kw):
        from fastserve.kvstore.service import KVStoreServiceConfig

        return pick(KVStoreServiceConfig, self, model=self._need_model(), instance_id=self._instance("kvstore"), **kw)

    def gateway_config(self, **kw):
        from fastserve.gateway.config import GatewayConfig

        return pick(GatewayConfig, self, served_model_name=self.model_name(), instance_id=self._instance("gw"), **kw)

    def _instance(self, service: str) -> str:
        # One --instance-id names the process; `up` runs several services in it.
        return f"{self.instance_id}-{service}" if self.instance_id else ""

    def _need_model(self) -> str:
        if not self.model:
            raise ConfigError("--model (or FASTSERVE_MODEL) is required")
        return self.model


def _die_with_parent() -> None:
    """In a rank process `up` starts: killed when `up` dies, however it dies."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def pick(cls, source, **overrides):
    """Build config `cls` from the same-named fields of `source`."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {f.name: getattr(source, f.name) for f in dataclasses.fields(source) if f.name in names}
    values.update(overrides)
    return cls(**values)


def ensure_default_model(cache: str | Path, preset: str = "small") -> Path:
    """The random-weight model `up` serves when no --model is given (made once)."""
    path = Path(os.path.expanduser(str(cache))) / f"llama-{preset}-random"
    if not (path / "model.safetensors").is_file():
        from fastserve.gpu_worker.model_maker import make_model

        print(f"fastserve: making a `{preset}` model with RANDOM weights in {path} (first run only). "
              f"It answers in gibberish; pass --model DIR to serve a real checkpoint.", file=sys.stderr)
        make_model(path, preset=preset)
    else:
        print(f"fastserve: serving the RANDOM-weight `{preset}` model in {path} (no --model given)", file=sys.stderr)
    return path


class Stack:
    """Some or all of the services on one bus, in this process (`fastserve up`, tests)."""

    def __init__(self, cfg: NodeConfig, bus, *, services=("kvstore", "worker", "scheduler", "gateway"),
                 gateway_overrides: dict | None = None, serve_http: bool = True):
        self.cfg = cfg
        self.bus = bus
        self.services = tuple(services)
        self.gateway_overrides = gateway_overrides or {}
        self.serve_http = serve_http  # False: the gateway serves the submission queue only (run-batch)
        self.kvstore = self.worker = self.scheduler = None
        self.ranks: list = []  # the worker's other ranks, when the replica is split (processes)
        self.runner = None
        self.port: int | None = None

    async def start(self) -> "Stack":
        cfg = self.cfg
        if "kvstore" in self.services and cfg.host_kv_enabled:
            from fastserve.kvstore.service import KVStoreService

            self.kvstore = KVStoreService(cfg.kvstore_config(), self.bus)
            await self.kvstore.start()
        starts = []
        if "worker" in self.services:
            from fastserve.gpu_worker.service import WorkerService

            worker_cfg = cfg.worker_config()
            if cfg.world_size > 1:
                worker_cfg = self._spawn_ranks(worker_cfg)
            self.worker = WorkerService(worker_cfg, self.bus)
            starts.append(self.worker.start())
        if "scheduler" in self.services:
            from fastserve.scheduler.service.service import SchedulerService

            self.scheduler = SchedulerService(cfg.scheduler_config(), self.bus)
            starts.append(self.scheduler.start())
        # Together: the scheduler listens for the worker's first heartbeat
        # while the worker loads its model.
        await asyncio.gather(*starts)
        if "gateway" in self.services:
            await self._start_gateway()
        return self

    def _spawn_ranks(self, worker_cfg):
        """Ranks 1..P*T-1 of a split replica as processes of this machine
        (`fastserve worker --rank R`); rank 0 is the worker service here."""
        import dataclasses as dc
        import subprocess

        from fastserve.gpu_worker.launch import free_port

        cfg = self.cfg
        init = f"tcp://127.0.0.1:{free_port()}"
        flags = ["--model", worker_cfg.model, "--pipeline-parallel-size", str(cfg.pipeline_parallel_size),
                 "--tensor-parallel-size", str(cfg.tensor_parallel_size), "--dist-init", init,
                 "--device", cfg.device, "--dtype", cfg.dtype, "--block-size", str(cfg.block_size),
                 "--dist-timeout", str(cfg.dist_timeout), "--log-level", cfg.log_level]
        if cfg.gpu_kv_blocks is not None:
            flags += ["--gpu-kv-blocks", str(cfg.gpu_kv_blocks)]
        if cfg.layer_split:
            flags += ["--layer-split", ",".join(map(str, cfg.layer_split))]
        for rank in range(1, cfg.world_size):
            self.ranks.append(subprocess.Popen([sys.executable, "-m", "fastserve.cli", "worker", "--rank", str(rank),
                                                *flags], preexec_fn=_die_with_parent))
        return dc.replace(worker_cfg, dist_init=init)

    async def restart_broken_worker(self) -> bool:
        """A split replica whose group broke (a rank died) is started again,
        all its ranks: its jobs continue by recompute (the scheduler saw the
        worker go). True when it did so."""
        if self.worker is None or not self.worker.broken:
            return False
        from fastserve.gpu_worker.service import WorkerService

        log.warning("worker group broken: starting it again", ranks=len(self.ranks) + 1)
        try:
            await self.worker.stop()
        except Exception:  # noqa: BLE001 - it is broken; what matters is the new one
            log.exception("stopping the broken worker failed")
        for proc in self.ranks:
            proc.kill()
            await asyncio.to_thread(proc.wait)
        self.ranks = []
        worker_cfg = self.cfg.worker_config()
        if self.cfg.world_size > 1:
            worker_cfg = self._spawn_ranks(worker_cfg)
        self.worker = WorkerService(worker_cfg, self.bus)
        await self.worker.start()
        return True

    async def supervise(self, stop: asyncio.Event, interval: float = 1.0) -> None:
        """Until `stop`: restart a worker group that broke (`fastserve up`)."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except asyncio.TimeoutError:
                await self.restart_broken_worker()

    async def _start_gateway(self) -> None:
        from aiohttp import web

        from fastserve.gateway.app import create_app

        app = create_app(self.cfg.gateway_config(**self.gateway_overrides), self.bus)
        self.runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self.runner.setup()
        if not self.serve_http:
            return
        site = web.TCPSite(self.runner, self.cfg.host, self.cfg.port)
        await site.start()
        self.port = self.runner.addresses[0][1] if self.runner.addresses else self.cfg.port

    @property
    def base_url(self) -> str:
        return f"http://{self.cfg.host}:{self.port}"

    async def stop(self) -> None:
        """Stop every service even if stopping another fails or is cut
        short; the KV store last, and its shared-memory pool file is removed
        whatever happened before (a pool left in /dev/shm holds RAM)."""
        try:
            if self.runner is not None:
                await self.runner.cleanup()
            for svc in (self.scheduler, self.worker):
                if svc is not None:
                    try:
                        await svc.stop()
                    except Exception:  # noqa: BLE001 - the next ones must still stop
                        log.exception("service stop failed", service=type(svc).__name__)
        finally:
            for proc in self.ranks:  # the leader's close() has stopped their loops: they exit
                try:
                    await asyncio.to_thread(proc.wait, 20)
                except Exception:  # noqa: BLE001 - a rank that does not exit is killed
                    proc.kill()
            if self.kvstore is not None:
                try:
                    await self.kvstore.stop()
                finally:
                    if self.kvstore.pool is not None:
                        self.kvstore.pool.close()


# ---------------------------------------------------------------------- commands

_SERVICES = ("scheduler", "worker", "kvstore")
_HELP = {
    "up": "run gateway, scheduler, worker and KV store (one process; --broker amqp:// for RabbitMQ)",
    "scheduler": "run one replica's scheduler service (RabbitMQ)",
    "worker": "run one replica's GPU worker service (RabbitMQ)",
    "kvstore": "run one replica's KV-store service: the host KV pool in shared memory (RabbitMQ)",
}


def register(subparsers) -> None:
    for name in ("up", *_SERVICES):
        if name in subparsers.choices:
            continue  # another part of the CLI registered it first
        p = subparsers.add_parser(name, help=_HELP[name], description=_HELP[name])
        add_config_args(p, NodeConfig)
        p.set_defaults(func=lambda args, _name=name: _main(_name, args))


def _main(command: str, args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(NodeConfig, args)
        if command == "worker" and cfg.rank > 0:
            return _serve_rank(cfg)
        if command == "up" and not cfg.model:
            cfg = config_from_args(NodeConfig, args, model=str(ensure_default_model(cfg.model_cache)))
        if command != "up" and cfg.broker.startswith("memory://"):
            raise ConfigError(f"`fastserve {command}` runs one service; it needs --broker amqp://... "
                              f"(the in-memory bus only joins services of one process: use `fastserve up`)")
        if command in ("worker", "kvstore") and not cfg.model:
            raise ConfigError("--model (or FASTSERVE_MODEL) is required")
    except ConfigError as exc:
        print(f"fastserve {command}: error: {exc}", file=sys.stderr)
        return 2
    from fastserve.common.logging import setup_logging

    setup_logging(command if command != "up" else "fastserve", cfg.log_level)
    services = ("kvstore", "worker", "scheduler", "gateway") if command == "up" else (command,)
    return asyncio.run(_serve(cfg, services))


def _serve_rank(cfg: NodeConfig) -> int:
    """`fastserve worker --rank R` (R > 0): one rank of a split replica. It
    needs no broker: it gets its work from rank 0 (the worker service) over
    torch.distributed, and serves until rank 0 closes the replica."""
    from fastserve.common.logging import setup_logging
    from fastserve.gpu_worker.launch import launch_rank, shutdown_distributed

    if not cfg.model:
        raise ConfigError("--model (or FASTSERVE_MODEL) is required")
    setup_logging(f"worker-rank{cfg.rank}", cfg.log_level)
    part = launch_rank(cfg.model, cfg.pipeline_parallel_size, cfg.tensor_parallel_size, cfg.rank, cfg.dist_init,
                       device=cfg.device, timeout=cfg.dist_timeout, layer_split=cfg.layer_split, dtype=cfg.dtype,
                       block_size=cfg.block_size, num_gpu_blocks=cfg.gpu_kv_blocks)
    log.info("worker rank serving", rank=cfg.rank, stage=part.ctx.stage, tp_rank=part.ctx.tp_rank,
             layers=part.engine.shard.num_layers)
    try:
        part.serve()
    finally:
        shutdown_distributed(part.ctx)
    return 0


async def _serve(cfg: NodeConfig, services: tuple[str, ...]) -> int:
    from fastserve.common.bus import make_bus

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)  # the handler only sets a flag
    bus = make_bus(cfg.broker, namespace=cfg.namespace, connection_name=f"fastserve-{'-'.join(services)}")
    await bus.connect()
    stack = Stack(cfg, bus, services=services)
    try:
        await stack.start()
        if "gateway" in services:
            print(f"fastserve: serving {cfg.model_name()!r} at {stack.base_url}/v1 "
                  f"(policy {cfg.policy}, broker {cfg.broker.split('@')[-1]})", file=sys.stderr)
        if "worker" in services and cfg.world_size > 1:
            await stack.supervise(stop)
        await stop.wait()
    finally:
        try:
            await asyncio.wait_for(stack.stop(), 10)
        finally:
            if stack.kvstore is not None and stack.kvstore.pool is not None:
                stack.kvstore.pool.close()  # also when stopping timed out
            await bus.close()
    return 0
