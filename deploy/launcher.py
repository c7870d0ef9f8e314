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
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fastserve.common.config import ConfigError, add_config_args, config_from_args

DEFAULT_MODEL_CACHE = "~/.cache/fastserve/models"


@dataclass
class NodeConfig:
    """The flags of `fastserve up` and of the per-service commands."""

    model: str | None = field(default=None, metadata={"help": "checkpoint directory; `up` without it makes a random-weight `small` model in --model-cache"})
    model_cache: str = field(default=DEFAULT_MODEL_CACHE, metadata={"help": "where `up` keeps the model it makes"})
    served_model_name: str | None = field(default=None, metadata={"help": "model name clients ask for (default: the model directory's name)"})
    broker: str = field(default="memory://", metadata={"help": "memory:// (one process only) or amqp://user:pass@host:5672/"})
    namespace: str = field(default="", metadata={"help": "prefix of every queue and exchange name (isolates deployments sharing a broker)"})
    replica: str = field(default="default", metadata={"help": "model replica this scheduler/worker/kvstore belongs to"})
    host: str = field(default="127.0.0.1", metadata={"help": "gateway listen address"})
    port: int = field(default=8000, metadata={"help": "gateway listen port"})
    api_key: str | None = field(default=None, metadata={"help": "comma-separated API keys the gateway accepts (default: none needed)"})
    policy: Literal["default", "gittins", "sj-mlfq", "mlfq", "fcfs"] = field(default="default", metadata={"help": "job scheduling policy (default: gittins, docs/scheduler.md)"})
    kv_policy: Literal["proactive", "reactive", "recompute", "none"] = field(default="proactive", metadata={"help": "KV placement policy"})
    max_batch_size: int = field(default=32, metadata={"help": "jobs per iteration"})
    max_tokens_per_batch: int = field(default=2048, metadata={"help": "tokens per iteration"})
    pipeline_depth: int = field(default=1, metadata={"help": "batches in flight per scheduler (>1 hides the bus round trip; one stage then alternates jobs between batches)"})
    max_queued_jobs: int = field(default=0, metadata={"help": "jobs a scheduler holds before leaving the rest in the queue (0: no limit)"})
    block_size: int = field(default=16, metadata={"help": "tokens per KV block"})
    gpu_kv_blocks: int | None = field(default=None, metadata={"help": "GPU KV blocks (default: sized from free memory)"})
    host_kv_blocks: int = field(default=1024, metadata={"help": "host (CPU) KV blocks in the KV store's shared pool"})
    host_kv_path: str | None = field(default=None, metadata={"help": "shared-memory file of the host pool (default: /dev/shm/fastserve-kv-<replica>.bin)"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda[:N]"})
    dtype: Literal["float32", "float16", "bfloat16"] = field(default="float32", metadata={"help": "weights and KV dtype"})
    profile: str | None = field(default=None, metadata={"help": "profile JSON from `fastserve profile` for the scheduler's cost model"})
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING, ERROR"})

    def __post_init__(self) -> None:
        if not (self.broker.startswith(("memory://", "amqp://", "amqps://"))):
            raise ValueError(f"broker must be memory:// or amqp://..., got {self.broker!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        for name in ("max_batch_size", "max_tokens_per_batch", "block_size", "pipeline_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.gpu_kv_blocks is not None and self.gpu_kv_blocks < 1:
            raise ValueError(f"gpu_kv_blocks must be >= 1, got {self.gpu_kv_blocks}")
        if self.host_kv_blocks < 0 or self.max_queued_jobs < 0:
            raise ValueError("host_kv_blocks and max_queued_jobs must be >= 0")
        if self.kv_policy in ("proactive", "reactive") and self.host_kv_blocks == 0:
            raise ValueError(f"kv_policy {self.kv_policy} moves KV to host memory: give --host-kv-blocks > 0 "
                             f"or use --kv-policy recompute|none")

    @property
    def host_kv_enabled(self) -> bool:
        return self.host_kv_blocks > 0 and self.kv_policy in ("proactive", "reactive")

    def model_name(self) -> str:
        return self.served_model_name or (Path(self.model).resolve().name if self.model else "fastserve")

    # ------------------------------------------------------------------ per-service configs
    def scheduler_config(self, **kw):
        from fastserve.scheduler.service.service import SchedulerServiceConfig

        return SchedulerServiceConfig(
            replica=self.replica, model=self.model_name(), policy=self.policy, kv_policy=self.kv_policy,
            max_batch_size=self.max_batch_size, max_tokens_per_batch=self.max_tokens_per_batch,
            gpu_kv_blocks=self.gpu_kv_blocks, host_kv_blocks=self.host_kv_blocks if self.host_kv_enabled else 0,
            profile=self.profile, max_queued_jobs=self.max_queued_jobs, pipeline_depth=self.pipeline_depth, **kw)

    def worker_config(self, **kw):
        from fastserve.gpu_worker.service import WorkerServiceConfig

        return WorkerServiceConfig(
            model=self._need_model(), replica=self.replica, device=self.device, dtype=self.dtype,
            block_size=self.block_size, gpu_kv_blocks=self.gpu_kv_blocks,
            host_kv_blocks=self.host_kv_blocks if self.host_kv_enabled else 0, host_kv_path=self.host_kv_path, **kw)

    def kvstore_config(self, **kw):
        from fastserve.kvstore.service import KVStoreServiceConfig

        return KVStoreServiceConfig(
            model=self._need_model(), replica=self.replica, block_size=self.block_size, dtype=self.dtype,
            host_kv_blocks=self.host_kv_blocks, host_kv_path=self.host_kv_path, **kw)

    def _need_model(self) -> str:
        if not self.model:
            raise ConfigError("--model (or FASTSERVE_MODEL) is required")
        return self.model


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
                 gateway_overrides: dict | None = None):
        self.cfg = cfg
        self.bus = bus
        self.services = tuple(services)
        self.gateway_overrides = gateway_overrides or {}
        self.kvstore = self.worker = self.scheduler = None
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

            self.worker = WorkerService(cfg.worker_config(), self.bus)
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

    async def _start_gateway(self) -> None:
        from aiohttp import web

        from fastserve.gateway.app import create_app

        app = create_app(gateway_config(self.cfg, **self.gateway_overrides), self.bus)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.cfg.host, self.cfg.port)
        await site.start()
        self.port = self.runner.addresses[0][1] if self.runner.addresses else self.cfg.port

    @property
    def base_url(self) -> str:
        return f"http://{self.cfg.host}:{self.port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        for svc in (self.scheduler, self.worker, self.kvstore):
            if svc is not None:
                await svc.stop()


def gateway_config(cfg: NodeConfig, **overrides):
    """The gateway's config from the shared node flags."""
    import dataclasses

    from fastserve.gateway.config import GatewayConfig

    names = {f.name for f in dataclasses.fields(GatewayConfig)}
    values = {"model": cfg.model, "model_dir": cfg.model, "served_model_name": cfg.model_name(),
              "broker": cfg.broker, "namespace": cfg.namespace, "host": cfg.host, "port": cfg.port,
              "api_keys": tuple(k for k in (cfg.api_key or "").split(",") if k),
              "log_level": cfg.log_level}
    kw = {k: v for k, v in values.items() if k in names}
    kw.update(overrides)
    return GatewayConfig(**kw)


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
        await stop.wait()
    finally:
        try:
            await asyncio.wait_for(stack.stop(), 10)
        finally:
            await bus.close()
    return 0
