"""Wire messages: versioned, msgpack-encoded, typed structs. No pickle.

A message on the wire is the msgpack map {"_t": type name, "_v": version,
<field>: <value>, ...}. What rides inside a message (a batch entry, a sampled
token, the sampling parameters) is a `@struct`: a dataclass that travels as
a map of its fields, never as a positional list. `decode` checks the type is
known, the version is the one this code speaks, every required field is
present and every value has the annotated type, recursively (ints are
accepted where floats are expected); anything else is a `SchemaError`, which
the bus turns into a dead letter.

Unknown extra fields are ignored so that a newer sender can add optional
fields without breaking an older receiver; removing or retyping a field needs
a version bump.

Supported annotations: str, int, float, bool, bytes, dict, dict[K, V],
list[X], tuple[X, ...], tuple[X, Y], X | None, Any, and @struct classes.
Checkers are compiled once per type, so decoding costs one call per value.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, TypeVar

import msgpack
import orjson

from fastserve.common.sampling_params import SamplingParams

SCHEMA_VERSION = 2


class SchemaError(ValueError):
    """Bytes that are not a valid message of a known type and version."""


class Message:
    """Base class of every wire message."""

    VERSION: ClassVar[int] = SCHEMA_VERSION


_REGISTRY: dict[str, type[Message]] = {}
_STRUCTS: set[type] = set()
_FIELDS: dict[type, tuple[str, ...]] = {}
_CHECKERS: dict[Any, Callable[[Any, str], Any]] = {}
M = TypeVar("M", bound=type[Message])
S = TypeVar("S", bound=type)


def message(cls: M) -> M:
    """Register a Message dataclass under its class name."""
    assert dataclasses.is_dataclass(cls) and issubclass(cls, Message), cls
    assert cls.__name__ not in _REGISTRY, f"duplicate message type {cls.__name__}"
    _REGISTRY[cls.__name__] = cls
    _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return cls


def struct(cls: S) -> S:
    """Register a dataclass that travels inside messages as a map of its fields."""
    assert dataclasses.is_dataclass(cls), cls
    _STRUCTS.add(cls)
    _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return cls


def message_types() -> dict[str, type[Message]]:
    return dict(_REGISTRY)


def _to_wire(value: Any) -> Any:
    cls = type(value)
    if cls in _STRUCTS:
        return {name: _to_wire(getattr(value, name)) for name in _FIELDS[cls]}
    if cls is list or cls is tuple:
        # Lists of scalars (token ids: the bulk of the traffic) go out as they are.
        if value and (type(value[0]) in _STRUCTS or type(value[0]) in (list, tuple, dict)):
            return [_to_wire(v) for v in value]
        return value
    if cls is dict:
        return {k: _to_wire(v) for k, v in value.items()}
    return value


def encode(msg: Message) -> bytes:
    cls = type(msg)
    if _REGISTRY.get(cls.__name__) is not cls:
        raise SchemaError(f"{cls.__name__} is not a registered message type")
    data: dict[str, Any] = {"_t": cls.__name__, "_v": cls.VERSION}
    for name in _FIELDS[cls]:
        data[name] = _to_wire(getattr(msg, name))
    return msgpack.packb(data, use_bin_type=True)


def encode_json(msg: Message) -> bytes:
    """The same map as `encode`, as JSON (the public interface, for clients in other languages)."""
    cls = type(msg)
    if _REGISTRY.get(cls.__name__) is not cls:
        raise SchemaError(f"{cls.__name__} is not a registered message type")
    data = {"_t": cls.__name__, "_v": cls.VERSION, **{n: _to_wire(getattr(msg, n)) for n in _FIELDS[cls]}}
    return orjson.dumps(data)


def decode(data: bytes, expected: type[Message] | tuple[type[Message], ...] | None = None) -> Any:
    """Bytes -> message; `expected` (a type or tuple of types) narrows what is accepted."""
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise SchemaError(f"not msgpack: {exc}") from exc
    return _from_raw(raw, expected)


def decode_json(data: bytes, expected: type[Message] | tuple[type[Message], ...] | None = None) -> Any:
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise SchemaError(f"not JSON: {exc}") from exc
    return _from_raw(raw, expected)


def _from_raw(raw: Any, expected: type[Message] | tuple[type[Message], ...] | None) -> Any:
    if not isinstance(raw, dict):
        raise SchemaError(f"message must be a map, got {type(raw).__name__}")
    name = raw.pop("_t", None)
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise SchemaError(f"unknown message type {name!r}")
    version = raw.pop("_v", None)
    if version != cls.VERSION:
        raise SchemaError(f"{name}: version {version!r} not supported (this side speaks {cls.VERSION})")
    if expected is not None and not issubclass(cls, expected):
        raise SchemaError(f"unexpected message type {name}")
    return _checker(cls)(raw, name)


def peek(data: bytes, *names: str) -> dict[str, Any]:
    """The named top-level string fields of bytes that may not decode as a
    message (to tell the sender of a malformed one why it was refused)."""
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:  # not msgpack at all: nothing to tell anyone
        return {}
    if not isinstance(raw, dict):
        return {}
    return {n: raw[n] for n in names if isinstance(raw.get(n), str) and raw[n]}


def from_wire(cls: type, value: Any, where: str = "") -> Any:
    """Check and build a struct (or any annotation) from plain msgpack data."""
    return _checker(cls)(value, where or getattr(cls, "__name__", str(cls)))


# ------------------------------------------------------------------ compiled checkers

def _checker(tp: Any) -> Callable[[Any, str], Any]:
    fn = _CHECKERS.get(tp)
    if fn is None:
        fn = _compile(tp)
        _CHECKERS[tp] = fn
    return fn


def _compile(tp: Any) -> Callable[[Any, str], Any]:
    if tp is Any:
        return lambda v, where: v
    if isinstance(tp, type) and (tp in _STRUCTS or tp in _FIELDS):
        return _compile_dataclass(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        nullable = len(options) != len(args)
        checks = [_checker(a) for a in options]

        def check_union(v, where):
            if v is None and nullable:
                return None
            errors = []
            for c in checks:
                try:
                    return c(v, where)
                except SchemaError as exc:
                    errors.append(str(exc))
            if not errors:
                raise SchemaError(f"{where}: expected a value, got None")
            raise SchemaError(errors[0] if len(errors) == 1 else f"{where}: {v!r:.80} matches none of {tp}")
        return check_union
    if origin in (list, tuple):
        as_tuple = origin is tuple
        if as_tuple and args and args[-1] is not Ellipsis:
            items = [_checker(a) for a in args]

            def check_fixed(v, where):
                if not isinstance(v, (list, tuple)):
                    raise SchemaError(f"{where}: expected a list, got {type(v).__name__}")
                if len(v) != len(items):
                    raise SchemaError(f"{where}: expected {len(items)} items, got {len(v)}")
                return tuple(c(x, f"{where}[{i}]") for i, (c, x) in enumerate(zip(items, v)))
            return check_fixed
        item = _checker(args[0]) if args else _checker(Any)
        scalar = args[0] if args and args[0] in (int, str) else None

        def check_seq(v, where):
            if not isinstance(v, (list, tuple)):
                raise SchemaError(f"{where}: expected a list, got {type(v).__name__}")
            if scalar is not None and all(type(x) is scalar for x in v):
                out = list(v)  # the common case (token ids), one pass in C
            else:
                out = [item(x, f"{where}[{i}]") for i, x in enumerate(v)]
            return tuple(out) if as_tuple else out
        return check_seq
    if origin is dict or tp is dict:
        kc = _checker(args[0]) if args else None
        vc = _checker(args[1]) if args else None

        def check_map(v, where):
            if not isinstance(v, dict):
                raise SchemaError(f"{where}: expected a map, got {type(v).__name__}")
            if kc is None:
                return v
            return {kc(k, f"{where} key"): vc(x, f"{where}[{k!r}]") for k, x in v.items()}
        return check_map
    if tp is float:
        def check_float(v, where):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise SchemaError(f"{where}: expected a number, got {type(v).__name__}")
            return float(v)
        return check_float
    if tp is int:
        def check_int(v, where):
            if isinstance(v, bool) or not isinstance(v, int):
                raise SchemaError(f"{where}: expected an int, got {type(v).__name__}")
            return v
        return check_int
    if tp in (str, bool, bytes):
        def check_plain(v, where):
            if not isinstance(v, tp):
                raise SchemaError(f"{where}: expected {tp.__name__}, got {type(v).__name__}")
            return v
        return check_plain
    raise SchemaError(f"unsupported annotation {tp!r}")  # a bug in a message definition


def _compile_dataclass(cls: type) -> Callable[[Any, str], Any]:
    hints = typing.get_type_hints(cls)
    spec = []
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        spec.append((f.name, required, hints[f.name]))
    name = cls.__name__
    compiled: list[tuple[str, bool, Callable]] = []

    def check_struct(v, where):
        if not compiled:  # lazily: a struct may refer to one defined after it
            compiled.extend((n, req, _checker(tp)) for n, req, tp in spec)
        if not isinstance(v, dict):
            raise SchemaError(f"{where}: expected a {name} map, got {type(v).__name__}")
        kwargs = {}
        for n, req, check in compiled:
            if n in v:
                kwargs[n] = check(v[n], f"{where}.{n}")
            elif req:
                raise SchemaError(f"{where}: missing field {n!r}")
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:  # __post_init__ validation
            raise SchemaError(f"{where}: {exc}") from exc
    return check_struct


struct(SamplingParams)


# ---------------------------------------------------------------- gateway <-> scheduler

# Priority classes of a job. Batch work waits below every interactive job.
PRIORITY_INTERACTIVE = 0
PRIORITY_BATCH = 1
PRIORITIES = (PRIORITY_INTERACTIVE, PRIORITY_BATCH)

@message
@dataclass(slots=True)
class JobSubmit(Message):
    """A job (gateway -> names.JOB_QUEUE). A continuation (the scheduler that
    held it died) repeats the prompt followed by the `num_generated` tokens
    already streamed: sampling counts positions from there, so a seeded job
    continues with the very tokens it would have drawn, and max_tokens still
    counts from the first generated token."""

    job_id: str
    trace_id: str
    reply_to: str  # queue the TokenBatches go to
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_time: float  # time.time() at the gateway
    model: str
    num_generated: int = 0
    deadline: float | None = None  # time.time() after which nobody waits for it
    # PRIORITY_INTERACTIVE, or PRIORITY_BATCH: runs only on capacity the interactive jobs leave.
    priority: int = 0

    def __post_init__(self) -> None:
        if not self.job_id:
            raise ValueError("job_id must not be empty")
        if not self.prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty")
        if not 0 <= self.num_generated < len(self.prompt_token_ids):
            raise ValueError(f"num_generated must be in [0, {len(self.prompt_token_ids)}), got {self.num_generated}")
        if self.priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {PRIORITIES}, got {self.priority}")

    @property
    def prompt_len(self) -> int:
        """Tokens of the original prompt (without the continued output)."""
        return len(self.prompt_token_ids) - self.num_generated


@message
@dataclass(slots=True)
class JobCancel(Message):
    """Stop a job and free its KV (gateway -> CONTROL_EXCHANGE, every scheduler hears it)."""

    job_id: str
    trace_id: str
    reason: str = ""


@struct
@dataclass(slots=True)
class TokenEvent:
    """New tokens of one job: a delta, only tokens since its last event. An
    event with no tokens and no end says the scheduler holds the job. The last
    event of a job has finish_reason ("stop" | "length" | "abort") or error."""

    job_id: str
    token_ids: list[int]
    logprobs: list[float] | None = None  # one per token id
    top_logprobs: list[list[TopLogprob]] | None = None  # per token: the top-k alternatives
    finish_reason: str | None = None
    error: str | None = None
    num_prompt_tokens: int = 0
    num_generated: int = 0  # total generated so far, this event included
    queue_time: float | None = None  # seconds from arrival to first scheduled (first token's event)
    # With the first token, if asked for: prompt positions 1.. (position 0 has none).
    prompt_logprobs: list[PromptLogprob] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@message
@dataclass(slots=True)
class TokenBatch(Message):
    """The token events of one iteration for one gateway (scheduler -> the
    gateway's reply queue): one message per gateway per iteration, not one
    per job."""

    scheduler_id: str
    events: list[TokenEvent]


# ---------------------------------------------------------------- liveness and stats

@struct
@dataclass(slots=True)
class WorkerInfo:
    """What a scheduler needs to know of its replica's worker (in its heartbeat)."""

    num_gpu_blocks: int
    block_size: int
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    bytes_per_block: int  # of a whole host block: every rank's chunk of it
    device: str = "cpu"
    pipeline_parallel_size: int = 1
    tensor_parallel_size: int = 1


@struct
@dataclass(slots=True)
class PoolSpec:
    """Where a host KV pool lives: what a worker needs to map it. Each KV-store
    instance makes its own file, so a changed path means a new, empty pool."""

    path: str
    num_blocks: int
    bytes_per_block: int

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.bytes_per_block


@message
@dataclass(slots=True)
class Heartbeat(Message):
    """Liveness (any service -> EVENTS_EXCHANGE, names.heartbeat_key). `queue`
    is the instance's own command queue (workers, KV stores); `info` is free-form
    diagnostics for people and /health, never acted on."""

    service: str  # "gateway" | "scheduler" | "worker" | "kvstore"
    instance_id: str
    ts: float
    replica: str = ""
    queue: str = ""
    worker: WorkerInfo | None = None
    pool: PoolSpec | None = None
    # A worker's progress with its scheduler (`scheduler_id`) in its current
    # epoch: the highest iteration received and finished, so the scheduler
    # can tell a lost command or result from a long step.
    scheduler_id: str = ""
    epoch: int = -1
    received: int = -1
    completed: int = -1
    info: dict = field(default_factory=dict)


@message
@dataclass(slots=True)
class SchedulerStats(Message):
    """Periodic state of one scheduler (-> EVENTS_EXCHANGE, names.stats_key)."""

    instance_id: str
    ts: float
    model: str = ""
    queue_lengths: list[int] = field(default_factory=list)  # jobs per MLFQ queue
    num_running: int = 0
    num_waiting: int = 0
    num_swapped: int = 0
    gpu_kv_usage: float = 0.0  # fraction of GPU KV blocks in use
    cpu_kv_usage: float = 0.0  # fraction of host KV blocks in use
    num_preemptions: int = 0  # cumulative since the scheduler started
    max_queued_jobs: int = 0  # admission limit (0: unlimited), so gateways can refuse early
    replica: str = ""
    iterations: int = 0  # cumulative: batches the worker ran
    step_seconds: float = 0.0  # cumulative: the worker's engine step time


# ---------------------------------------------------------------- the dashboard's picture of a replica

@struct
@dataclass(slots=True)
class SnapshotJob:
    """One job as the dashboard draws it. `state`: "running" (in the latest
    batch), "in_flight" (an earlier iteration of it is still at the worker),
    "waiting", "host" (its KV offloaded to host memory) or "moving" (a KV copy
    in flight; `kv` says which way: "to_host" or "to_gpu"). `kv`: where its KV
    is ("none", "gpu", "host", "to_host", "to_gpu")."""

    job_id: str
    level: int
    state: str
    kv: str
    generated: int  # tokens sampled so far (results back)
    charge: float  # seconds of service charged in its current level
    join_level: int  # the level it joined on arrival (skip-join)
    prompt_len: int


@struct
@dataclass(slots=True)
class SnapshotLevel:
    """One MLFQ level: its first jobs in priority order (and every job of the
    latest batch), `more` the jobs of the level not listed."""

    level: int
    quantum: float | None  # seconds; None: never demoted out (the last level, fcfs, srpt)
    num_jobs: int
    more: int
    jobs: list[SnapshotJob] = field(default_factory=list)


@struct
@dataclass(slots=True)
class SnapshotKV:
    gpu_used: int
    gpu_total: int
    host_used: int
    host_total: int
    offloading: int  # copies GPU -> host in flight
    uploading: int  # copies host -> GPU in flight


@struct
@dataclass(slots=True)
class SnapshotCounters:
    """Cumulative since the scheduler started: rates come from differences."""

    admitted: int = 0
    finished: int = 0
    cancelled: int = 0
    preemptions: int = 0
    demotions: int = 0
    promotions: int = 0
    offloads: int = 0
    uploads: int = 0
    drops: int = 0


@struct
@dataclass(slots=True)
class CoreSnapshot:
    """What the scheduler core holds, bounded (scheduler/core/snapshot.py)."""

    iteration: int
    slo: float  # seconds per output token (mean normalized latency target)
    num_jobs: int
    num_running: int
    levels: list[SnapshotLevel]
    kv: SnapshotKV
    counters: SnapshotCounters


@struct
@dataclass(slots=True)
class LoopTotals:
    """Cumulative timings of the scheduler's loop (scheduler/service/loop_stats.py).
    Per iteration: `step` is the worker's engine step, `schedule` the
    scheduler's own work (schedule(), update(), building the command), and
    round trip - step the time command and result spent on the bus."""

    iterations: int = 0
    tokens: int = 0  # tokens the worker sampled
    step_seconds: float = 0.0
    schedule_seconds: float = 0.0
    round_trip_seconds: float = 0.0
    back_to_back: int = 0  # iterations whose result followed the previous one without an idle gap
    wall_seconds: float = 0.0  # result-to-result time of those iterations
    snapshot_seconds: float = 0.0  # building these snapshots
    snapshots: int = 0


@message
@dataclass(slots=True)
class SchedulerSnapshot(Message):
    """A scheduler's queues, KV placement and loop timings, a few times a
    second, for the dashboard (-> EVENTS_EXCHANGE, names.snapshot_key)."""

    instance_id: str
    ts: float  # time.time()
    core: CoreSnapshot
    loop: LoopTotals
    replica: str = ""
    model: str = ""
    policy: str = ""
    kv_policy: str = ""
    max_batch_size: int = 0


# ---------------------------------------------------------------- scheduler <-> worker

@struct
@dataclass(slots=True)
class NewJob:
    """A job the worker has not seen: its tokens so far and how to sample."""

    job_id: str
    trace_id: str
    token_ids: list[int]  # prompt, then the tokens already generated
    sampling: SamplingParams
    num_generated: int = 0  # the last num_generated of token_ids are output tokens


@struct
@dataclass(slots=True)
class RunEntry:
    """One job's share of an iteration. Its tokens are the worker's own
    list[num_computed : num_computed + num_new_tokens] (the worker appends
    every token it samples, so a decode job fed in consecutive iterations
    reads the token it sampled the iteration before). `block_table` (whole)
    replaces the job's table when it changed other than by appending (after
    an upload or a recompute); else `append_blocks` extend it."""

    job_id: str
    num_computed: int
    num_new_tokens: int
    sample: bool
    append_blocks: list[int] = field(default_factory=list)
    block_table: list[int] | None = None


@message
@dataclass(slots=True)
class BatchCommand(Message):
    """One iteration for one worker (scheduler -> the worker instance's queue).

    Full data only for jobs the worker has not seen (`new`), deltas for the
    others, and the ids the worker must forget (`free`). `epoch` changes when
    the scheduler starts over with the worker (its GPU KV is considered lost):
    a worker that sees a newer epoch, or another scheduler, forgets every job
    first, and drops commands of older epochs. A command with no `run` only frees."""

    replica: str
    epoch: int
    iteration: int
    new: list[NewJob] = field(default_factory=list)
    run: list[RunEntry] = field(default_factory=list)
    free: list[str] = field(default_factory=list)
    sent_at: float = 0.0
    scheduler_id: str = ""


@struct
@dataclass(slots=True)
class TopLogprob:
    token_id: int
    logprob: float


@struct
@dataclass(slots=True)
class PromptLogprob:
    """One prompt token's logprob under the model, its rank, and the top-k there."""

    logprob: float
    rank: int
    top: list[TopLogprob] = field(default_factory=list)


@struct
@dataclass(slots=True)
class SampledToken:
    """What one job of an iteration produced; `error` set: this job failed
    alone (bad parameters, ...) and the rest of the batch went on."""

    job_id: str
    token_id: int = -1
    logprob: float = 0.0
    top_logprobs: list[TopLogprob] | None = None
    error: str | None = None
    prompt_logprobs: list[PromptLogprob] | None = None  # with a job's first token, if asked for


@message
@dataclass(slots=True)
class BatchResult(Message):
    """What one iteration produced (worker -> names.scheduler_queue): one entry
    per sampling job, and one per job that failed."""

    replica: str
    epoch: int
    iteration: int
    worker_id: str
    tokens: list[SampledToken] = field(default_factory=list)
    step_seconds: float = 0.0  # the engine's own step() time
    error: str | None = None  # the whole step failed
    # Jobs the command named that the worker does not hold (a command that
    # registered them was lost, e.g. with a broker restart): the scheduler
    # starts over with the worker, and those jobs continue by recompute.
    unknown_jobs: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- KV moves

@struct
@dataclass(slots=True)
class KVMoveOrder:
    """One job's KV to move: offload its GPU blocks to host memory, or upload
    it back into these (newly allocated) GPU blocks. `move_id` is unique per
    scheduler; every report names it, so a late report of an earlier move of
    the same job is never mistaken for the current one."""

    move_id: int
    job_id: str
    direction: str  # "offload" | "upload"
    gpu_blocks: list[int]

    def __post_init__(self) -> None:
        if self.direction not in ("offload", "upload"):
            raise ValueError(f"direction must be 'offload' or 'upload', got {self.direction!r}")


@message
@dataclass(slots=True)
class KVPlan(Message):
    """The moves the placement policy chose in one iteration (scheduler -> the
    KV-store instance's queue). Uploads come in the order they are wanted
    (earliest estimated next scheduled time first). `free`: jobs whose host
    copy is no longer needed (finished, cancelled, recomputed)."""

    replica: str
    worker_queue: str  # where the copies go
    moves: list[KVMoveOrder] = field(default_factory=list)
    free: list[str] = field(default_factory=list)
    # A plan from another scheduler than the last one: the old one is gone,
    # and the host copies it placed with it.
    scheduler_id: str = ""


@message
@dataclass(slots=True)
class KVCopy(Message):
    """One block copy for a worker (KV store -> the worker instance's queue)."""

    replica: str
    move_id: int
    job_id: str
    direction: str  # "offload": GPU -> host; "upload": host -> GPU
    gpu_blocks: list[int]
    host_blocks: list[int]
    pool: PoolSpec

    def __post_init__(self) -> None:
        if self.direction not in ("offload", "upload"):
            raise ValueError(f"direction must be 'offload' or 'upload', got {self.direction!r}")
        if len(self.gpu_blocks) != len(self.host_blocks):
            raise ValueError(f"gpu_blocks ({len(self.gpu_blocks)}) and host_blocks ({len(self.host_blocks)}) "
                             "differ in length")


@message
@dataclass(slots=True)
class KVCopyDone(Message):
    """A move ended (worker -> KV_EXCHANGE, heard by the scheduler and the KV
    store of the replica; the KV store also sends one when it refuses a move)."""

    replica: str
    move_id: int
    job_id: str
    direction: str
    seconds: float = 0.0
    error: str | None = None
    # The KV store gave up waiting: the copy may still be running at the
    # worker, so its GPU blocks are not safe to reuse until the worker has
    # started over.
    timed_out: bool = False


# ---------------------------------------------------------------- the public submission interface (docs/queue.md)
# Versioned apart from the internal messages: clients outside this repository speak it.
SUBMIT_URLS = ("/v1/completions", "/v1/chat/completions")


@message
@dataclass(slots=True)
class SubmitRequest(Message):
    """A request on names.SUBMIT_QUEUE, as msgpack (content type
    application/msgpack) or JSON (application/json). The AMQP reply_to property
    names the queue its result goes to; expiration, the deadline (with
    timestamp: counted from it). `request_id` is the client's own: an id that
    ran is never run again (its stored result is sent again)."""

    VERSION: ClassVar[int] = 1
    request_id: str
    url: str  # one of SUBMIT_URLS
    body: dict  # that endpoint's OpenAI request body, without "stream"
    priority: int = PRIORITY_BATCH
    tokens: bool = False  # also send RequestTokens as the tokens come

    def __post_init__(self) -> None:
        if not self.request_id or len(self.request_id) > 256:
            raise ValueError("request_id must be 1 to 256 characters")
        if self.url not in SUBMIT_URLS:
            raise ValueError(f"url must be one of {', '.join(SUBMIT_URLS)}, got {self.url!r}")
        if self.priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {PRIORITIES}, got {self.priority}")


@struct
@dataclass(slots=True)
class Timings:
    queued: float  # seconds from the message's timestamp (else from the gateway taking it) to the gateway taking it
    total: float  # seconds from the gateway taking it to its result
    first_token: float | None = None  # seconds from the gateway taking it to its first token


@message
@dataclass(slots=True)
class SubmitResult(Message):
    """The one result of a request (gateway -> the request's reply_to, with
    correlation_id = request_id and the request's content type)."""

    VERSION: ClassVar[int] = 1
    request_id: str
    status: int  # 200, else the HTTP status the REST endpoint would have answered
    response: dict | None = None  # what the REST endpoint would have answered (choices, usage)
    error: dict | None = None  # OpenAI's error object {"message", "type", "param", "code"}
    token_ids: list[list[int]] = field(default_factory=list)  # per choice of `response`
    timings: Timings | None = None


@message
@dataclass(slots=True)
class RequestTokens(Message):
    """New output of one choice of a request that asked for `tokens`."""

    VERSION: ClassVar[int] = 1
    request_id: str
    index: int
    text: str
    token_ids: list[int]
