"""Submit prompts through RabbitMQ and print the results as they finish
(docs/queue.md). Start a server first, e.g.

    fastserve up --broker amqp://guest:guest@127.0.0.1:5672/

then

    python docs/examples/queue_client.py --broker amqp://guest:guest@127.0.0.1:5672/ --n 20

Run it twice: the second run gets the stored results of the same request ids
at once (idempotent ids), nothing is generated again.
"""
from __future__ import annotations

import argparse
import asyncio

from fastserve.client import Client


async def main(args: argparse.Namespace) -> int:
    async with Client(args.broker, namespace=args.namespace, reply_queue=args.reply_queue) as client:
        await client.submit_many((f"example-{i}", "/v1/completions",
                                  {"model": args.model, "prompt": f"Question {i}:", "max_tokens": 12,
                                   "temperature": 0}) for i in range(args.n))
        failed = 0
        async for r in client.results():
            print(f"{r.request_id}\t{r.status}\t{r.finish_reason}\t{r.usage and r.usage['completion_tokens']}\t"
                  f"{r.text!r}" if r.ok else f"{r.request_id}\t{r.status}\t{r.error['message']}")
            failed += not r.ok
        await client.delete_reply_queue()
    return 1 if failed else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--broker", default="amqp://guest:guest@127.0.0.1:5672/")
    p.add_argument("--namespace", default="", help="the server's --namespace")
    p.add_argument("--model", default="llama-small-random", help="the served model's name")
    p.add_argument("--reply-queue", default="fastserve-example-results")
    p.add_argument("--n", type=int, default=20)
    raise SystemExit(asyncio.run(main(p.parse_args())))
