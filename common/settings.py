"""Every setting of fastserve, defined once: default, help text, validation.

A config dataclass (one per service, the node config of `fastserve up`, the
simulator's) declares a field with the setting's name and type and takes the
rest from here:

    @dataclass
    class WorkerServiceConfig:
        block_size: int = settings.BLOCK_SIZE()
        def __post_init__(self): settings.validate(self)

The field name is the flag (`--block-size`) and the environment variable
(`FASTSERVE_BLOCK_SIZE`, common/config.py), so one setting has one name, one
default and one rule everywhere.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

# "default" names the policy `fastserve up` runs (scheduler/core/policies.py DEFAULT_POLICY).
POLICIES = ("default", "gittins", "sj-mlfq", "mlfq", "fcfs", "srpt", "oracle")
KV_POLICIES = ("proactive", "reactive", "recompute", "none")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Setting:
    default: Any
    help: str
    check: Callable[[Any], bool] | None = None
    rule: str = ""  # what `check` demands, for the error message

    def __call__(self, default: Any = dataclasses.MISSING) -> Any:
        """A dataclass field with this setting's default (or another one, for a
        config whose context fixes it, e.g. a test) and metadata."""
        value = self.default if default is dataclasses.MISSING else default
        meta = {"help": self.help, "setting": self}
        if isinstance(value, (list, dict, set)):
            return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
        return dataclasses.field(default=value, metadata=meta)


def validate(obj: Any) -> None:
    """Check every field of a config dataclass against its setting's rule."""
    for f in dataclasses.fields(obj):
        s = f.metadata.get("setting")
        if s is None or s.check is None:
            continue
        value = getattr(obj, f.name)
        if value is None and (s.default is None or f.default is None):
            continue
        if not s.check(value):
            raise ValueError(f"{f.name} {s.rule}, got {value!r}")


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def _non_negative(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0


def _fraction(v) -> bool:
    return isinstance(v, (int, float)) and 0 <= v < 1


def _one_of(choices) -> Callable[[Any], bool]:
    return lambda v: v in choices


POS, NONNEG = "must be > 0", "must be >= 0"

# ------------------------------------------------------------------ deployment
MODEL = Setting(None, "checkpoint directory (config.json, safetensors, tokenizer.json); `up` without it makes "
                      "a random-weight `small` model in --model-cache")
MODEL_CACHE = Setting("~/.cache/fastserve/models", "where `up` keeps the model it makes")
SERVED_MODEL_NAME = Setting(None, "model name clients ask for (default: the model directory's name)")
BROKER = Setting("memory://", "memory:// (one process only) or amqp://user:pass@host:5672/",
                 lambda v: v.startswith(("memory://", "amqp://", "amqps://")), "must be memory:// or amqp://...")
NAMESPACE = Setting("", "prefix of every queue and exchange name (isolates deployments sharing a broker)")
REPLICA = Setting("default", "model replica this scheduler/worker/KV store belongs to")
INSTANCE_ID = Setting("", "this process's id on the bus (default: random)")
HOST = Setting("127.0.0.1", "gateway listen address")
PORT = Setting(8000, "gateway listen port", lambda v: 0 < v < 65536, "must be in 1..65535")
API_KEY = Setting(None, "comma-separated API keys the gateway accepts (default: none needed)")
LOG_LEVEL = Setting("INFO", "DEBUG, INFO, WARNING, ERROR",
                    lambda v: v.upper() in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
                    "must be DEBUG, INFO, WARNING or ERROR")
HEARTBEAT_INTERVAL = Setting(1.0, "seconds between heartbeats", _positive, POS)

# ------------------------------------------------------------------ engine
DEVICE = Setting("cpu", "cpu or cuda[:N]")
DTYPE = Setting("float32", "weights and KV dtype", _one_of(DTYPES), f"must be one of {', '.join(DTYPES)}")
BLOCK_SIZE = Setting(16, "tokens per KV block", _positive, POS)
GPU_KV_BLOCKS = Setting(None, "GPU KV blocks (default: sized from free memory)", _positive, POS)
HOST_KV_BLOCKS = Setting(1024, "host (CPU) KV blocks in the KV store's shared pool", _non_negative, NONNEG)
HOST_KV_DIR = Setting(None, "directory of the host pool's shared-memory file (default: /dev/shm); each KV "
                            "store instance makes its own file there")

# ------------------------------------------------------------------ distributed execution
PIPELINE_PARALLEL_SIZE = Setting(1, "pipeline stages a replica's model is split over (P x T worker processes "
                                    "per replica)", _positive, POS)
TENSOR_PARALLEL_SIZE = Setting(1, "tensor-parallel ranks per pipeline stage", _positive, POS)
RANK = Setting(0, "this worker's rank in its replica (0: the one that talks to the scheduler; stage = rank // T)",
               _non_negative, NONNEG)
DIST_INIT = Setting(None, "rendezvous of a replica's worker ranks, tcp://HOST:PORT (default: torch's MASTER_ADDR / "
                          "MASTER_PORT variables)")
LAYER_SPLIT = Setting(None, "layers of each pipeline stage, comma-separated (default: balanced by parameter count)")
DIST_TIMEOUT = Setting(300.0, "seconds a worker rank waits for its peers (joining, and each transfer) before "
                              "the replica counts as broken", _positive, POS)

# ------------------------------------------------------------------ scheduling
POLICY = Setting("default", "job scheduling policy (default: gittins, docs/scheduler.md)", _one_of(POLICIES), f"must be one of {', '.join(POLICIES)}")
KV_POLICY = Setting("proactive", "KV placement policy", _one_of(KV_POLICIES),
                    f"must be one of {', '.join(KV_POLICIES)}")
MAX_BATCH_SIZE = Setting(32, "jobs per iteration", _positive, POS)
MAX_TOKENS_PER_BATCH = Setting(2048, "tokens per iteration", _positive, POS)
NUM_QUEUES = Setting(10, "MLFQ queues", _positive, POS)
QUANTUM_RATIO = Setting(2.0, "quantum of queue i+1 / quantum of queue i", lambda v: v >= 1, "must be >= 1")
BASE_QUANTUM = Setting(None, "Q0's quantum in seconds (default: one decode iteration of the cost model)",
                       _positive, POS)
STARVATION_THRESHOLD = Setting(None, "seconds without running after which a job is promoted to Q0 "
                                     "(default: 50 x the SLO)", _positive, POS)
WATERMARK = Setting(0.05, "proactive placement: offload idle jobs while fewer than this fraction of GPU blocks "
                          "is free", _fraction, "must be in [0, 1)")
RESERVE = Setting(0.10, "proactive placement: upload ahead of need while more than this fraction stays free",
                  _fraction, "must be in [0, 1)")
PROFILE = Setting(None, "profile JSON from `fastserve profile` for the scheduler's cost model")
MAX_QUEUED_JOBS = Setting(0, "jobs a scheduler holds before leaving the rest in the queue (0: no limit)",
                          _non_negative, NONNEG)
MAX_BATCHES_IN_FLIGHT = Setting(2, "batches a scheduler keeps in flight: 2 plans the next iteration while the "
                                   "worker runs one (1: strictly one at a time)", _positive, POS)

# ------------------------------------------------------------------ failure handling
WORKER_TIMEOUT = Setting(10.0, "seconds without a worker heartbeat after which it counts as gone", _positive, POS)
WORKER_GRACE = Setting(60.0, "seconds jobs wait for a lost worker to come back before they fail", _positive, POS)
KVSTORE_TIMEOUT = Setting(10.0, "seconds without a KV-store heartbeat after which host KV counts as lost",
                          _positive, POS)
COPY_TIMEOUT = Setting(30.0, "seconds a KV copy may take before it counts as failed", _positive, POS)
MAX_COPIES_IN_FLIGHT = Setting(4, "KV copies the KV store keeps in flight per direction", _positive, POS)
REQUEST_TIMEOUT = Setting(600.0, "seconds after which the gateway ends a request with an error (a deadline: "
                                 "nothing waits forever)", _positive, POS)
HEALTH_TIMEOUT = Setting(10.0, "seconds without a heartbeat after which a service counts as gone", _positive, POS)
QUEUE_TIMEOUT = Setting(86400.0, "seconds a request from the submission queue (or the Batch API) may take when "
                                  "its message sets no expiration", _positive, POS)

# ------------------------------------------------------------------ queue-based submission
DATABASE = Setting("sqlite:///~/.cache/fastserve/fastserve.db",
                   "where the gateway keeps Batch API files and batches and the submission queue's results: "
                   "sqlite:///PATH (one node) or postgresql://user@host:5432/db (several gateways share it)",
                   lambda v: v.startswith(("sqlite:///", "postgresql://", "postgres://")),
                   "must be sqlite:///PATH or postgresql://...")
RESULT_RETENTION = Setting(7 * 86400.0, "seconds the gateway keeps a queued request's result (within it, the same "
                                        "request id gets the stored result instead of running again)", _positive, POS)
QUEUE_CONCURRENCY = Setting(128, "requests a gateway takes from the submission queue at once (the rest wait in "
                                 "the broker); 0: this gateway does not consume it", _non_negative, NONNEG)
