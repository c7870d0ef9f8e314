"""`fastserve run-batch -i requests.jsonl -o results.jsonl [--broker amqp://...]`:
OpenAI's batch file format (common/batch_format.py) through the submission queue.

Each input line is a request of the queue; each result is one output line,
appended as it finishes (a line that cannot run gets its error line). Run it
again after an interruption and it submits only the lines whose custom_id
the output file lacks; the request ids are derived from the input file and
the custom_id, so a request that finished but was not written yet is not run
again (its stored result comes back). Every custom_id ends up in the output
exactly once.

With --broker amqp://... the requests go to that deployment; without it the
whole stack runs in this process on the in-memory bus (a model as for `up`).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import signal
import sys
import uuid
from pathlib import Path

import orjson

from fastserve.client import Client, Result
from fastserve.common.batch_format import BatchLine, dumps_line, error_line, parse_line
from fastserve.common.config import ConfigError, add_config_args, config_from_args
from fastserve.common.schemas import SubmitRequest, SubmitResult

HELP = "run an OpenAI batch file (JSONL) through the submission queue; rerun to continue after an interruption"


def register(subparsers) -> None:
    from fastserve.launcher import NodeConfig

    p = subparsers.add_parser("run-batch", help=HELP, description=HELP + ". Without --broker the whole stack runs "
                              "in this process (the other flags as for `fastserve up`).")
    p.add_argument("-i", "--input-file", required=True, help="requests, one JSON object a line (custom_id, method, "
                   "url = /v1/completions or /v1/chat/completions, body)")
    p.add_argument("-o", "--output-file", required=True, help="results, one line per custom_id (appended)")
    p.add_argument("--reply-queue", default=None, help="durable reply queue on the broker (default: one derived "
                   "from the input file, so a rerun finds the results that came while it was away)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_args(p, NodeConfig)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from fastserve.launcher import NodeConfig, ensure_default_model

    try:
        cfg = config_from_args(NodeConfig, args)
        if cfg.broker.startswith("memory://") and not cfg.model:
            cfg = config_from_args(NodeConfig, args, model=str(ensure_default_model(cfg.model_cache)))
    except ConfigError as exc:
        print(f"fastserve run-batch: error: {exc}", file=sys.stderr)
        return 2
    from fastserve.common.logging import setup_logging

    setup_logging("run-batch", "WARNING" if cfg.log_level.upper() == "INFO" else cfg.log_level)
    return asyncio.run(run_batch(cfg, Path(args.input_file), Path(args.output_file), reply_queue=args.reply_queue,
                                 progress=not args.no_progress))


def request_id(digest: str, custom_id: str) -> str:
    """Stable across reruns of the same input file: the queue runs each once."""
    tail = custom_id if len(custom_id) <= 200 else hashlib.sha256(custom_id.encode()).hexdigest()
    return f"rb-{digest}-{tail}"


def done_ids(output: Path) -> set[str]:
    """custom_ids (or, for lines without one, line ids) already in the output;
    a last line cut short by an interruption is removed."""
    if not output.exists():
        return set()
    data = output.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        output.write_bytes(data)
    done = set()
    for text in data.splitlines():
        line = orjson.loads(text)
        done.add(line["custom_id"] if line.get("custom_id") is not None else line["id"])
    return done


async def run_batch(cfg, input_file: Path, output_file: Path, *, reply_queue: str | None = None,
                    progress: bool = True) -> int:
    raw = input_file.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()[:16]
    lines: list[BatchLine] = []
    seen: set[str] = set()
    for i, text in enumerate(t for t in raw.splitlines() if t.strip()):
        lines.append(parse_line(i, text, seen=seen))
    done = done_ids(output_file)
    todo = [ln for ln in lines if _key(ln) not in done]
    by_rid = {request_id(digest, ln.custom_id): ln for ln in todo if ln.error is None}

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)  # the handler only sets a flag
    from tqdm import tqdm

    bar = tqdm(total=len(lines), initial=len(lines) - len(todo), unit="req", disable=not progress,
               file=sys.stderr)
    async with contextlib.AsyncExitStack() as stack:
        client = await _client(cfg, stack, reply_queue or f"fastserve.run-batch.{digest}")
        with output_file.open("a") as out:
            def write(line: dict) -> None:
                out.write(dumps_line(line) + "\n")
                out.flush()
                bar.update(1)

            for ln in todo:
                if ln.error is not None:
                    write({**error_line(ln.custom_id, "invalid_request", ln.error), "id": _line_id(ln)})
            if by_rid:
                await client.submit_many((rid, ln.url, ln.body) for rid, ln in by_rid.items())
                results = client.results()
                waiter = asyncio.ensure_future(stop.wait())
                try:
                    while True:
                        nxt = asyncio.ensure_future(anext(results))
                        await asyncio.wait({nxt, waiter}, return_when=asyncio.FIRST_COMPLETED)
                        if not nxt.done():
                            nxt.cancel()
                            with contextlib.suppress(asyncio.CancelledError):
                                await nxt
                            break
                        try:
                            result: Result = nxt.result()
                        except StopAsyncIteration:
                            break
                        ln = by_rid[result.request_id]
                        write({**_output(ln, result), "id": _line_id(ln)})
                finally:
                    waiter.cancel()
                    await results.aclose()
            if not stop.is_set():
                await client.delete_reply_queue()  # every result is written
    bar.close()
    if stop.is_set():
        print(f"fastserve run-batch: interrupted; run the same command again to continue "
              f"({len(done_ids(output_file))} of {len(lines)} lines done)", file=sys.stderr)
        return 130
    return 0


def _key(ln: BatchLine) -> str:
    return ln.custom_id if ln.custom_id is not None else _line_id(ln)


def _line_id(ln: BatchLine) -> str:
    return f"batch_req_line{ln.index + 1}"


def _output(ln: BatchLine, result: Result) -> dict:
    from fastserve.common.batch_format import result_line

    return result_line(ln.custom_id, SubmitResult(result.request_id, result.status, result.response, result.error))


async def _client(cfg, stack: contextlib.AsyncExitStack, reply_queue: str) -> Client:
    if not cfg.broker.startswith("memory://"):
        return await stack.enter_async_context(Client(cfg.broker, reply_queue=reply_queue, namespace=cfg.namespace))
    from fastserve.common.bus import make_bus
    from fastserve.launcher import Stack

    bus = make_bus(cfg.broker, namespace=cfg.namespace)
    await bus.connect()
    stack.push_async_callback(bus.close)
    node = Stack(cfg, bus, serve_http=False)
    stack.push_async_callback(node.stop)
    await node.start()
    client = _BusClient(bus)
    await client.connect()
    return client


class _BusClient(Client):
    """The client over the in-process bus of the embedded stack."""

    def __init__(self, bus) -> None:
        super().__init__("memory://")
        self.bus = bus
        self._reply_name = f"fastserve.run-batch.{uuid.uuid4().hex[:8]}"

    async def connect(self) -> None:
        await self.bus.declare_queue(self._reply_name, durable=False, exclusive=True, auto_delete=True)

        async def deliver(d) -> None:
            await self._inbox.put(_Incoming(d.body))

        await self.bus.consume_deliveries(self._reply_name, deliver)

    async def close(self) -> None:
        pass

    async def delete_reply_queue(self) -> None:
        pass  # exclusive: it goes with the bus

    async def _publish(self, msg: SubmitRequest, expiration: float | None, now: float) -> None:
        from fastserve.common import names
        from fastserve.common.bus import Properties
        from fastserve.common.schemas import encode

        await self.bus.publish(names.SUBMIT_QUEUE, encode(msg), props=Properties(
            reply_to=self.bus.full_name(self._reply_name), correlation_id=msg.request_id, expiration=expiration,
            timestamp=now))


class _Incoming:
    """What Client.messages() reads of a delivery (the in-memory bus acks by itself)."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def ack(self) -> None:
        pass

    async def reject(self) -> None:
        pass
