"""Bus round-trip and throughput: MemoryBus (baseline) vs RabbitBus, same run.

    python benchmarks/bench_bus.py [--broker amqp://guest:guest@127.0.0.1:5672/] [--n 2000]

Round trip: a TokenEvent-sized message to a queue whose consumer answers on a
second queue (what one scheduler <-> worker iteration pays on the wire).
Throughput: n messages published back to back (publisher confirms on RabbitMQ)
until the consumer has handled them all. Prints JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid

from fastserve.common.bus import make_bus
from fastserve.common.schemas import TokenBatch, TokenEvent, encode


async def measure(url: str, n: int, rtts: int) -> dict:
    bus = make_bus(url, namespace=f"bench-{uuid.uuid4().hex[:8]}", connection_name="bench-bus")
    await bus.connect()
    try:
        for q in ("ping", "pong", "flood"):
            await bus.declare_queue(q, durable=False, auto_delete=True)
        # One iteration's token message for one gateway with one job in it (what the bus carries most).
        body = encode(TokenBatch("sched-" + "x" * 8, [TokenEvent("job-" + "x" * 32, [1234], logprobs=[-0.5],
                                                                num_generated=10)]))

        async def echo(data, headers):
            await bus.publish("pong", data)

        pongs: asyncio.Queue = asyncio.Queue()
        await bus.consume("ping", echo, prefetch=1)
        await bus.consume("pong", lambda data, headers: pongs.put(time.perf_counter()), prefetch=1)
        samples = []
        for _ in range(rtts):
            t0 = time.perf_counter()
            await bus.publish("ping", body)
            samples.append(await pongs.get() - t0)
        samples.sort()

        done = asyncio.Event()
        count = 0

        async def sink(data, headers):
            nonlocal count
            count += 1
            if count == n:
                done.set()

        await bus.consume("flood", sink, prefetch=256)
        t0 = time.perf_counter()
        await asyncio.gather(*(bus.publish("flood", body) for _ in range(n)))
        await done.wait()
        elapsed = time.perf_counter() - t0
        return {"rtt_p50_ms": 1e3 * statistics.median(samples), "rtt_p99_ms": 1e3 * samples[int(0.99 * len(samples))],
                "msgs_per_s": n / elapsed, "message_bytes": len(body)}
    finally:
        if hasattr(bus, "delete_declared"):
            await bus.delete_declared()
        await bus.close()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--broker", default="amqp://guest:guest@127.0.0.1:5672/")
    ap.add_argument("--n", type=int, default=2000, help="messages for the throughput run")
    ap.add_argument("--rtts", type=int, default=300, help="round trips measured")
    args = ap.parse_args()
    memory = await measure("memory://", args.n, args.rtts)
    rabbit = await measure(args.broker, args.n, args.rtts)
    print(json.dumps({"memory": memory, "rabbitmq": rabbit,
                      "rtt_ratio_rabbit_over_memory": rabbit["rtt_p50_ms"] / memory["rtt_p50_ms"]}, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
