"""`fastserve run-batch` as a process: OpenAI batch lines in, one output line
per custom_id; a malformed line gets its error line and the rest runs;
interrupted (SIGINT) halfway and run again, the output has every custom_id
exactly once, each the greedy output of the offline engine."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid

import pytest

from fastserve.common import names
from fastserve.launcher import Stack
from test_queue_api import node, served_text
from test_services_stack import offline_greedy, prompts

pytestmark = pytest.mark.timeout(300)


def batch_lines(ps, max_tokens):
    return [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": "tiny", "prompt": p, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}}
            for i, p in enumerate(ps)]


def command(inp, out, *flags):
    return [sys.executable, "-m", "fastserve.cli", "run-batch", "-i", str(inp), "-o", str(out), "--no-progress",
            *flags]


def read_output(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_embedded_run_with_a_malformed_line_and_a_chat_line(tiny_model_dir, tmp_path):
    ps = prompts(6, 10, seed=11)
    expected = offline_greedy(tiny_model_dir, ps, 6)
    lines = [json.dumps(x) for x in batch_lines(ps, 6)]
    lines.insert(2, '{"custom_id": "broken", "url": "/v1/completions", "body": "not an object"}')
    lines.insert(4, "this is not JSON")
    lines.append(json.dumps({"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}}))
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    flags = ["--model", str(tiny_model_dir), "--served-model-name", "tiny", "--gpu-kv-blocks", "64",
             "--host-kv-blocks", "0", "--kv-policy", "recompute", "--database", f"sqlite:///{tmp_path}/db.sqlite"]
    proc = subprocess.run(command(inp, out, *flags), capture_output=True, timeout=240)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    got = read_output(out)
    assert len(got) == 9
    by_id = {g["custom_id"]: g for g in got}
    assert by_id["broken"]["response"] is None and "body must be a JSON object" in by_id["broken"]["error"]["message"]
    nameless = [g for g in got if g["custom_id"] is None]
    assert len(nameless) == 1 and "not JSON" in nameless[0]["error"]["message"]
    assert by_id["chat"]["response"]["status_code"] == 200
    assert by_id["chat"]["response"]["body"]["object"] == "chat.completion"
    for i in range(6):
        body = by_id[f"req-{i}"]["response"]["body"]
        assert body["choices"][0]["text"] == served_text(tiny_model_dir, ps[i], expected[i])
        assert body["usage"]["completion_tokens"] == 6
    # Run again: everything is there, nothing is added.
    proc = subprocess.run(command(inp, out, *flags), capture_output=True, timeout=240)
    assert proc.returncode == 0 and read_output(out) == got


async def test_interrupted_and_rerun_every_custom_id_exactly_once(rabbit_bus, rabbitmq_url, bus_namespace,
                                                                  tiny_model_dir, tmp_path):
    import asyncio

    n = 300
    ps = prompts(n, 12, seed=13)
    expected = offline_greedy(tiny_model_dir, ps, 24)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in batch_lines(ps, 24)))
    stack = await Stack(node(tiny_model_dir, tmp_path, max_batch_size=8), rabbit_bus,
                        serve_http=False).start()
    flags = ["--broker", rabbitmq_url, "--namespace", bus_namespace, "--reply-queue",
             f"{bus_namespace}.run-batch-{uuid.uuid4().hex[:6]}"]
    try:
        proc = subprocess.Popen(command(inp, out, *flags), stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not out.exists() or len(out.read_bytes().splitlines()) < n // 3:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "run-batch made no progress"
            await asyncio.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.to_thread(proc.communicate, timeout=60)
        assert proc.returncode == 130, err.decode()[-3000:]
        first = read_output(out)
        assert n // 3 <= len(first) < n, "interrupted too late to prove anything"
        assert len({g["custom_id"] for g in first}) == len(first)
        rerun = await asyncio.to_thread(subprocess.run, command(inp, out, *flags), capture_output=True, timeout=240)
        assert rerun.returncode == 0, rerun.stderr.decode()[-3000:]
    finally:
        await stack.stop()
        for q in (names.SUBMIT_QUEUE, names.BATCH_RESULTS_QUEUE):
            await rabbit_bus.declare_queue(q)
    got = read_output(out)
    assert got[:len(first)] == first  # appended to, never rewritten
    assert sorted(g["custom_id"] for g in got) == sorted(f"req-{i}" for i in range(n))
    for g in got:
        assert g["response"]["status_code"] == 200, g
        assert g["response"]["body"]["usage"]["completion_tokens"] == 24
    wrong = [g["custom_id"] for g in got if g["response"]["body"]["choices"][0]["text"] != served_text(
        tiny_model_dir, ps[int(g["custom_id"][4:])], expected[int(g["custom_id"][4:])])]
    assert not wrong, wrong[:5]
