"""Wire messages: versioned, msgpack-encoded dataclasses. No pickle.

A message on the wire is the msgpack map {"_t": type name, "_v": version,
<field>: <value>, ...}. `decode` checks the type is known, the version is the
one this code speaks, every required field is present and every value has the
annotated type (ints are accepted where floats are expected); anything else is
a `SchemaError`, which the bus turns into a dead letter.

Unknown extra fields are ignored so that a newer sender can add optional
fields without breaking an older receiver; removing or retyping a field needs
a version bump.

To add a message: a `@dataclass(slots=True)` subclass of `Message` decorated
with `@message`, fields annotated with the types `_check` understands (str,
int, float, bool, bytes, dict, list[...], tuple[...], X | None, Any).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import msgpack

SCHEMA_VERSION = 1


class SchemaError(ValueError):
    """Bytes that are not a valid message of a known type and version."""


class Message:
    """Base class of every wire message."""

    VERSION: ClassVar[int] = SCHEMA_VERSION


_REGISTRY: dict[str, type[Message]] = {}
_HINTS: dict[type, dict[str, Any]] = {}
M = TypeVar("M", bound=type[Message])


def message(cls: M) -> M:
    """Register a Message dataclass under its class name."""
    assert dataclasses.is_dataclass(cls) and issubclass(cls, Message), cls
    assert cls.__name__ not in _REGISTRY, f"duplicate message type {cls.__name__}"
    _REGISTRY[cls.__name__] = cls
    return cls


def message_types() -> dict[str, type[Message]]:
    return dict(_REGISTRY)


def encode(msg: Message) -> bytes:
    cls = type(msg)
    if _REGISTRY.get(cls.__name__) is not cls:
        raise SchemaError(f"{cls.__name__} is not a registered message type")
    data: dict[str, Any] = {"_t": cls.__name__, "_v": cls.VERSION}
    for f in dataclasses.fields(msg):
        data[f.name] = getattr(msg, f.name)
    return msgpack.packb(data, use_bin_type=True)


def decode(data: bytes, expected: type[Message] | tuple[type[Message], ...] | None = None) -> Any:
    """Bytes -> message; `expected` (a type or tuple of types) narrows what is accepted."""
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise SchemaError(f"not msgpack: {exc}") from exc
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
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SchemaError(f"{name}: missing field {f.name!r}")
            continue
        kwargs[f.name] = _check(raw[f.name], hints[f.name], f"{name}.{f.name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # __post_init__ validation
        raise SchemaError(f"{name}: {exc}") from exc


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _check(value: Any, tp: Any, where: str) -> Any:
    """Validate `value` against annotation `tp`; return it (tuples restored from lists)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(value, arg, where)
            except SchemaError as exc:
                errors.append(str(exc))
        raise SchemaError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise SchemaError(f"{where}: expected a list, got {type(value).__name__}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise SchemaError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_check(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise SchemaError(f"{where}: expected a map, got {type(value).__name__}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SchemaError(f"{where}: expected a number, got {type(value).__name__}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SchemaError(f"{where}: expected an int, got {type(value).__name__}")
        return value
    if tp in (str, bool, bytes):
        if not isinstance(value, tp):
            raise SchemaError(f"{where}: expected {tp.__name__}, got {type(value).__name__}")
        return value
    raise SchemaError(f"{where}: unsupported annotation {tp!r}")  # a bug in a message definition


# ---------------------------------------------------------------- gateway <-> scheduler

@message
@dataclass(slots=True)
class JobSubmit(Message):
    """A new job (gateway -> names.JOB_QUEUE). `sampling` holds the fields of
    fastserve.gpu_worker.sampling.SamplingParams (stop strings stay in the gateway)."""

    job_id: str
    trace_id: str
    reply_to: str  # queue the TokenEvents go to
    prompt_token_ids: list[int]
    sampling: dict
    arrival_time: float  # time.time() at the gateway
    model: str

    def __post_init__(self) -> None:
        if not self.job_id:
            raise ValueError("job_id must not be empty")
        if not self.prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty")


@message
@dataclass(slots=True)
class JobCancel(Message):
    """Stop a job and free its KV (gateway -> CONTROL_EXCHANGE, every scheduler hears it)."""

    job_id: str
    trace_id: str
    reason: str = ""


@message
@dataclass(slots=True)
class TokenEvent(Message):
    """New tokens of one job (scheduler -> the job's reply_to queue). A delta:
    only tokens since the last event. The last event of a job has finish_reason
    ("stop" | "length" | "abort") or error set."""

    job_id: str
    trace_id: str
    token_ids: list[int]
    logprobs: list[float] | None = None  # one per token id
    # per token: [[token_id, logprob], ...] of the top-k alternatives
    top_logprobs: list[list[list[Any]]] | None = None
    finish_reason: str | None = None
    error: str | None = None
    num_prompt_tokens: int = 0
    num_generated: int = 0  # total generated so far, this event included
    # with the first token, if asked for: per prompt position from 1, [logprob, rank, [[token_id, logprob], ...]]
    prompt_logprobs: list[list[Any]] | None = None
    queue_time: float | None = None  # seconds from arrival to first scheduled (first event only)
    scheduler_id: str = ""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


# ---------------------------------------------------------------- liveness and stats

@message
@dataclass(slots=True)
class Heartbeat(Message):
    """Liveness (any service -> EVENTS_EXCHANGE, names.heartbeat_key)."""

    service: str  # "gateway" | "scheduler" | "worker" | "kvstore"
    instance_id: str
    ts: float
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


# ---------------------------------------------------------------- SERVICES: scheduler <-> worker <-> kvstore
# (BatchCommand, BatchResult, KV copy messages are appended below this line.)


@message
@dataclass(slots=True)
class BatchCommand(Message):
    """One iteration for one replica's workers (scheduler -> names.worker_queue).

    Full data only for jobs the worker has not seen (`new`), deltas for the
    others, and the ids the worker must forget (`free`).
    new:  [job_id, token_ids (prompt + generated so far), sampling dict, trace_id]: registers a job;
          it is then also listed in `run` like every job of the batch.
    run:  [job_id, num_computed, num_new_tokens, sample, append_blocks, block_table | None]
          the tokens are the worker's own list[num_computed : num_computed + num_new_tokens];
          block_table (full) replaces the table when it changed other than by
          appending (after an upload), else append_blocks extend it.
    """

    replica: str
    iteration: int
    new: list[list[Any]] = field(default_factory=list)
    run: list[list[Any]] = field(default_factory=list)
    free: list[str] = field(default_factory=list)
    sent_at: float = 0.0


@message
@dataclass(slots=True)
class BatchResult(Message):
    """What one iteration produced (last worker stage -> names.scheduler_queue).
    results: [job_id, token_id, logprob, top_logprobs | None, prompt_logprobs | None] for entries
    with sample=True; prompt_logprobs (with a job's first token, if asked for): per prompt
    position from 1, [logprob, rank, [[token_id, logprob], ...]]."""

    replica: str
    iteration: int
    results: list[list[Any]] = field(default_factory=list)
    step_seconds: float = 0.0  # the engine's own step() time
    error: str | None = None


@message
@dataclass(slots=True)
class KVPlan(Message):
    """The placement policy's moves of one iteration (scheduler -> names.kvstore_queue).
    moves: [job_id, "offload" | "upload", src_blocks, dst_blocks]; free: jobs whose
    KV is gone (finished, cancelled, dropped for recompute)."""

    replica: str
    iteration: int
    moves: list[list[Any]] = field(default_factory=list)
    free: list[str] = field(default_factory=list)


@message
@dataclass(slots=True)
class KVCopy(Message):
    """One block copy for a worker (kvstore -> names.worker_queue). The worker
    starts it once its step for `after_iteration` (if any) has finished."""

    replica: str
    copy_id: str
    job_id: str
    direction: str  # "offload": GPU -> host; "upload": host -> GPU
    src_blocks: list[int]
    dst_blocks: list[int]
    after_iteration: int = -1
    reply_to: str = ""

    def __post_init__(self) -> None:
        if self.direction not in ("offload", "upload"):
            raise ValueError(f"direction must be 'offload' or 'upload', got {self.direction!r}")
        if len(self.src_blocks) != len(self.dst_blocks):
            raise ValueError(f"src_blocks ({len(self.src_blocks)}) and dst_blocks ({len(self.dst_blocks)}) differ in length")


@message
@dataclass(slots=True)
class KVCopyDone(Message):
    """A copy finished (worker -> kvstore, then kvstore -> scheduler)."""

    replica: str
    copy_id: str
    job_id: str
    direction: str
    seconds: float = 0.0
    error: str | None = None
