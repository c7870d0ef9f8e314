import asyncio
import io
import json

import logging

import pytest
import structlog

from fastserve.common.logging import bind_job, get_logger, setup_logging


@pytest.fixture(autouse=True)
def _restore_logging():
    handlers = logging.getLogger().handlers[:]
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    logging.getLogger().handlers = handlers


def _lines(buf):
    return [json.loads(line) for line in buf.getvalue().decode().splitlines() if line.strip()]


def test_json_lines_with_service_and_bound_ids():
    buf = io.BytesIO()
    setup_logging("gateway", "DEBUG", stream=buf)
    log = get_logger("t")
    with bind_job("job-1", "trace-1"):
        log.info("job.start", prompt_tokens=3)
    log.debug("after")
    get_logger("t", service="scheduler").warning("other")
    first, second, third = _lines(buf)
    assert first["event"] == "job.start" and first["job_id"] == "job-1" and first["trace_id"] == "trace-1"
    assert first["service"] == "gateway" and first["level"] == "info" and first["prompt_tokens"] == 3
    assert "job_id" not in second and second["level"] == "debug"
    assert third["service"] == "scheduler"


def test_level_filters():
    buf = io.BytesIO()
    setup_logging("x", "WARNING", stream=buf)
    get_logger().info("hidden")
    get_logger().error("shown")
    assert [line["event"] for line in _lines(buf)] == ["shown"]


async def test_bus_handlers_never_leak_ids_between_messages(memory_bus):
    buf = io.BytesIO()
    setup_logging("scheduler", "INFO", stream=buf)
    log = get_logger()
    done = asyncio.Event()

    async def handler(body, headers):
        if body == b"first":
            structlog.contextvars.bind_contextvars(job_id="leaky")
        log.info("handled", body=body.decode())
        if body == b"second":
            done.set()

    await memory_bus.declare_queue("q")
    await memory_bus.consume("q", handler)
    await memory_bus.publish("q", b"first")
    await memory_bus.publish("q", b"second")
    await asyncio.wait_for(done.wait(), 5)
    lines = {line["body"]: line for line in _lines(buf) if line["event"] == "handled"}
    assert lines["first"]["job_id"] == "leaky"
    assert "job_id" not in lines["second"]


def test_logger_name_tells_services_apart_in_one_process():
    buf = io.BytesIO()
    setup_logging("fastserve", "INFO", stream=buf)
    structlog.get_logger("fastserve.scheduler").info("a")
    structlog.get_logger("fastserve.worker").info("b")
    get_logger().info("c")
    a, b, c = _lines(buf)
    assert (a["service"], a["logger"]) == ("fastserve", "fastserve.scheduler")
    assert b["logger"] == "fastserve.worker"
    assert "logger" not in c


def test_readable_lines_on_a_terminal():
    class Tty(io.BytesIO):
        def isatty(self):
            return True

    buf = Tty()
    setup_logging("gateway", "INFO", stream=buf)
    get_logger("t").info("request", path="/v1/models", status=200)
    logging.getLogger("aiohttp.server").warning("from the stdlib")
    text = buf.getvalue().decode()
    assert "request" in text and "path" in text and "/v1/models" in text and "from the stdlib" in text
    assert not text.lstrip().startswith("{")  # not JSON
