import msgpack
import pytest

from fastserve.common import schemas
from fastserve.common.schemas import (
    Heartbeat,
    JobCancel,
    JobSubmit,
    SchedulerStats,
    SchemaError,
    TokenEvent,
    decode,
    encode,
)


def _job(**kw):
    base = dict(
        job_id="j1", trace_id="t1", reply_to="fastserve.reply.g1", prompt_token_ids=[1, 2, 3],
        sampling={"temperature": 0.0, "max_tokens": 4}, arrival_time=12.5, model="m",
    )
    base.update(kw)
    return JobSubmit(**base)


@pytest.mark.parametrize(
    "msg",
    [
        _job(),
        JobCancel("j1", "t1", reason="client disconnected"),
        TokenEvent("j1", "t1", [5, 6], logprobs=[-0.5, -1.25], top_logprobs=[[[5, -0.5], [7, -2.0]], [[6, -1.25]]],
                   finish_reason="length", num_prompt_tokens=3, num_generated=2, queue_time=0.01),
        TokenEvent("j2", "t2", [], error="boom"),
        Heartbeat("scheduler", "s1", 1.5, {"model": "m", "replica": "r0"}),
        SchedulerStats("s1", 2.0, queue_lengths=[1, 0, 3], num_running=2, gpu_kv_usage=0.5, num_preemptions=7),
    ],
)
def test_roundtrip(msg):
    assert decode(encode(msg)) == msg


def test_wire_is_versioned_msgpack_map():
    raw = msgpack.unpackb(encode(JobCancel("j", "t")))
    assert raw == {"_t": "JobCancel", "_v": schemas.SCHEMA_VERSION, "job_id": "j", "trace_id": "t", "reason": ""}


def _raw(**fields):
    return msgpack.packb(fields)


@pytest.mark.parametrize(
    "data, match",
    [
        (b"\xc1garbage", "not msgpack"),
        (msgpack.packb([1, 2]), "must be a map"),
        (_raw(_t="Nope", _v=1), "unknown message type"),
        (_raw(_t="JobCancel", _v=99, job_id="j", trace_id="t"), "version 99"),
        (_raw(_t="JobCancel", _v=1, job_id="j"), "missing field 'trace_id'"),
        (_raw(_t="JobCancel", _v=1, job_id=3, trace_id="t"), r"JobCancel.job_id: expected str"),
        (_raw(_t="TokenEvent", _v=1, job_id="j", trace_id="t", token_ids=[1, "x"]), r"token_ids\[1\]: expected an int"),
        (_raw(_t="TokenEvent", _v=1, job_id="j", trace_id="t", token_ids=[True]), "expected an int"),
        (_raw(_t="Heartbeat", _v=1, service="s", instance_id="i", ts="now"), "expected a number"),
        (_raw(_t="JobSubmit", _v=1, job_id="j", trace_id="t", reply_to="r", prompt_token_ids=[],
              sampling={}, arrival_time=0, model="m"), "prompt_token_ids must not be empty"),
    ],
)
def test_bad_data_raises_schema_error(data, match):
    with pytest.raises(SchemaError, match=match):
        decode(data)


def test_int_accepted_as_float_and_extra_fields_ignored():
    msg = decode(_raw(_t="Heartbeat", _v=1, service="s", instance_id="i", ts=3, future_field=[1]))
    assert msg == Heartbeat("s", "i", 3.0)
    assert isinstance(msg.ts, float)


def test_expected_type_narrowing():
    data = encode(JobCancel("j", "t"))
    assert decode(data, JobCancel).job_id == "j"
    with pytest.raises(SchemaError, match="unexpected message type JobCancel"):
        decode(data, (JobSubmit, TokenEvent))


def test_unregistered_class_is_refused():
    from dataclasses import dataclass

    @dataclass
    class Rogue(schemas.Message):
        x: int

    with pytest.raises(SchemaError, match="not a registered"):
        encode(Rogue(1))


def test_finished_property():
    assert not TokenEvent("j", "t", [1]).finished
    assert TokenEvent("j", "t", [1], finish_reason="stop").finished
    assert TokenEvent("j", "t", [], error="x").finished
