"""Logs through structlog, one line per event: JSON when stderr is not a
terminal (files, containers, collectors), readable colored lines when it is.

Every line carries `service` (set here, or bound per component in the
one-process mode), a UTC timestamp, the level, and whatever is bound in
structlog's contextvars: bind `job_id` and `trace_id` with `bind_job(...)` and
every line logged inside, in any module, carries them, so one request can be
followed across services by grepping one id. The bus clears the contextvars
around each handled message so ids never leak from one message to the next.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import orjson
import structlog


def _orjson_dumps(obj: Any, default: Any = None) -> bytes:
    return orjson.dumps(obj, default=default or repr)


def setup_logging(service: str, level: str | int = "INFO", *, stream: IO[bytes] | None = None,
                  pretty: bool | None = None) -> None:
    """Configure structlog (and the stdlib root logger, for aio-pika/aiohttp)
    to write to `stream` (default: stderr): JSON lines for log collectors, or
    readable colored lines when `pretty` (default: when the stream is a
    terminal). Safe to call again."""
    if isinstance(level, str):
        level_no = logging.getLevelName(level.upper())
        if not isinstance(level_no, int):
            raise ValueError(f"unknown log level {level!r}")
    else:
        level_no = level
    out = stream if stream is not None else sys.stderr.buffer
    if pretty is None:
        pretty = out.isatty()

    def add_service(logger: Any, _name: str, event_dict: dict) -> dict:
        event_dict.setdefault("service", service)
        # In the one-process mode every service shares `service`; the logger
        # name (fastserve.scheduler, fastserve.worker, ...) tells them apart.
        name = getattr(logger, "name", None)
        if name:
            event_dict.setdefault("logger", name)
        return event_dict

    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_service,
    ]
    if pretty:
        console = structlog.dev.ConsoleRenderer(colors=True)
        render = [structlog.processors.StackInfoRenderer(), console, lambda _l, _n, text: text.encode()]
        foreign = [structlog.stdlib.ProcessorFormatter.remove_processors_meta, console]
    else:
        render = [structlog.processors.StackInfoRenderer(), structlog.processors.dict_tracebacks,
                  structlog.processors.JSONRenderer(serializer=_orjson_dumps)]
        foreign = [structlog.stdlib.ProcessorFormatter.remove_processors_meta, structlog.processors.dict_tracebacks,
                   structlog.processors.JSONRenderer()]
    structlog.configure(
        processors=[*shared, *render],
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=_NamedBytesLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    # Libraries log through stdlib logging; render those as JSON lines too.
    handler = logging.StreamHandler(_TextToBytes(out))
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=foreign,
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(max(level_no, logging.INFO))
    for noisy in ("aio_pika", "aiormq", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(level_no, logging.WARNING))


class _NamedBytesLogger(structlog.BytesLogger):
    """structlog's BytesLogger, remembering the name it was asked for."""

    def __init__(self, file: IO[bytes], name: str | None) -> None:
        super().__init__(file)
        self.name = name


class _NamedBytesLoggerFactory:
    def __init__(self, out: IO[bytes]) -> None:
        self._out = out

    def __call__(self, *args: Any) -> _NamedBytesLogger:
        return _NamedBytesLogger(self._out, args[0] if args and isinstance(args[0], str) else None)


class _TextToBytes:
    """A text stream facade over a binary one, for logging.StreamHandler."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out

    def write(self, text: str) -> int:
        return self._out.write(text.encode())

    def flush(self) -> None:
        self._out.flush()


def get_logger(name: str | None = None, **bound: Any) -> Any:
    return structlog.get_logger(name).bind(**bound) if bound else structlog.get_logger(name)


@contextmanager
def bind_job(job_id: str, trace_id: str, **extra: Any) -> Iterator[None]:
    """Bind job_id/trace_id (and extras) for every log line inside the block."""
    with structlog.contextvars.bound_contextvars(job_id=job_id, trace_id=trace_id, **extra):
        yield
