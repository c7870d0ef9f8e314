import msgpack
import pytest

from fastserve.common import schemas
from fastserve.common.sampling_params import SamplingParams
from fastserve.common.schemas import (
    BatchCommand,
    BatchResult,
    Heartbeat,
    JobCancel,
    JobSubmit,
    KVCopy,
    KVCopyDone,
    KVMoveOrder,
    KVPlan,
    NewJob,
    PoolSpec,
    RunEntry,
    SampledToken,
    SchedulerStats,
    SchemaError,
    TokenBatch,
    TokenEvent,
    TopLogprob,
    WorkerInfo,
    decode,
    encode,
)

V = schemas.SCHEMA_VERSION


def _job(**kw):
    base = dict(
        job_id="j1", trace_id="t1", reply_to="fastserve.reply.g1", prompt_token_ids=[1, 2, 3],
        sampling=SamplingParams(temperature=0.0, max_tokens=4, stop_token_ids=(7,)), arrival_time=12.5, model="m",
    )
    base.update(kw)
    return JobSubmit(**base)


POOL = PoolSpec("/dev/shm/fastserve-kv-x.bin", 8, 4096)


@pytest.mark.parametrize(
    "msg",
    [
        _job(),
        _job(prompt_token_ids=[1, 2, 3, 9], num_generated=1, deadline=99.5),
        JobCancel("j1", "t1", reason="client disconnected"),
        TokenBatch("s1", [TokenEvent("j1", [5, 6], logprobs=[-0.5, -1.25],
                                     top_logprobs=[[TopLogprob(5, -0.5), TopLogprob(7, -2.0)], [TopLogprob(6, -1.25)]],
                                     finish_reason="length", num_prompt_tokens=3, num_generated=2, queue_time=0.01),
                          TokenEvent("j2", [], error="boom")]),
        Heartbeat("scheduler", "s1", 1.5, replica="r0", info={"model": "m"}),
        Heartbeat("worker", "w1", 1.5, replica="r0", queue="q", epoch=3, received=7, completed=6,
                  worker=WorkerInfo(64, 16, 2048, 512, [2], 8192)),
        Heartbeat("kvstore", "k1", 1.5, replica="r0", queue="q", pool=POOL),
        SchedulerStats("s1", 2.0, queue_lengths=[1, 0, 3], num_running=2, gpu_kv_usage=0.5, num_preemptions=7),
        BatchCommand("r0", 1, 5, new=[NewJob("a", "t", [1, 2, 3], SamplingParams(seed=3), num_generated=1)],
                     run=[RunEntry("a", 0, 3, True, append_blocks=[4]), RunEntry("b", 9, 1, True, block_table=[1, 2])],
                     free=["c"], sent_at=1.0),
        BatchResult("r0", 1, 5, "w1", tokens=[SampledToken("a", 11, -0.25, [TopLogprob(11, -0.25)]),
                                              SampledToken("b", error="bad")], step_seconds=0.01),
        KVPlan("r0", "q.w1", moves=[KVMoveOrder(3, "a", "offload", [1, 2])], free=["z"]),
        KVCopy("r0", 3, "a", "upload", [1, 2], [7, 8], POOL),
        KVCopyDone("r0", 3, "a", "upload", seconds=0.5, error="x", timed_out=True),
    ],
)
def test_roundtrip(msg):
    assert decode(encode(msg)) == msg


def test_wire_is_versioned_msgpack_map_of_named_fields():
    raw = msgpack.unpackb(encode(JobCancel("j", "t")))
    assert raw == {"_t": "JobCancel", "_v": V, "job_id": "j", "trace_id": "t", "reason": ""}
    cmd = msgpack.unpackb(encode(BatchCommand("r", 0, 1, run=[RunEntry("a", 0, 3, True, append_blocks=[4])])))
    assert cmd["run"] == [{"job_id": "a", "num_computed": 0, "num_new_tokens": 3, "sample": True,
                           "append_blocks": [4], "block_table": None}]


def _raw(**fields):
    return msgpack.packb(fields)


@pytest.mark.parametrize(
    "data, match",
    [
        (b"\xc1garbage", "not msgpack"),
        (msgpack.packb([1, 2]), "must be a map"),
        (_raw(_t="Nope", _v=V), "unknown message type"),
        (_raw(_t="JobCancel", _v=99, job_id="j", trace_id="t"), "version 99"),
        (_raw(_t="JobCancel", _v=V, job_id="j"), "missing field 'trace_id'"),
        (_raw(_t="JobCancel", _v=V, job_id=3, trace_id="t"), r"JobCancel.job_id: expected str"),
        (_raw(_t="TokenBatch", _v=V, scheduler_id="s", events=[{"job_id": "j", "token_ids": [1, "x"]}]),
         r"events\[0\].token_ids\[1\]: expected an int"),
        (_raw(_t="TokenBatch", _v=V, scheduler_id="s", events=[{"job_id": "j", "token_ids": [True]}]),
         "expected an int"),
        (_raw(_t="Heartbeat", _v=V, service="s", instance_id="i", ts="now"), "expected a number"),
        (_raw(_t="JobSubmit", _v=V, job_id="j", trace_id="t", reply_to="r", prompt_token_ids=[],
              sampling={}, arrival_time=0, model="m"), "prompt_token_ids must not be empty"),
        # What rides inside a command is checked too, down to the sampling parameters.
        (_raw(_t="JobSubmit", _v=V, job_id="j", trace_id="t", reply_to="r", prompt_token_ids=[1],
              sampling={"top_p": 3.0}, arrival_time=0, model="m"), "top_p must be in"),
        (_raw(_t="BatchCommand", _v=V, replica="r", epoch=0, iteration=1, run=[[1, 2, 3]]),
         r"run\[0\]: expected a RunEntry map"),
        (_raw(_t="BatchCommand", _v=V, replica="r", epoch=0, iteration=1, run=[{"job_id": "a"}]),
         r"run\[0\]: missing field 'num_computed'"),
        (_raw(_t="KVCopy", _v=V, replica="r", move_id=1, job_id="a", direction="sideways", gpu_blocks=[],
              host_blocks=[], pool={"path": "p", "num_blocks": 1, "bytes_per_block": 1}), "direction must be"),
    ],
)
def test_bad_data_raises_schema_error(data, match):
    with pytest.raises(SchemaError, match=match):
        decode(data)


def test_int_accepted_as_float_and_extra_fields_ignored():
    msg = decode(_raw(_t="Heartbeat", _v=V, service="s", instance_id="i", ts=3, future_field=[1]))
    assert msg == Heartbeat("s", "i", 3.0)
    assert isinstance(msg.ts, float)


def test_expected_type_narrowing():
    data = encode(JobCancel("j", "t"))
    assert decode(data, JobCancel).job_id == "j"
    with pytest.raises(SchemaError, match="unexpected message type JobCancel"):
        decode(data, (JobSubmit, TokenBatch))


def test_unregistered_class_is_refused():
    from dataclasses import dataclass

    @dataclass
    class Rogue(schemas.Message):
        x: int

    with pytest.raises(SchemaError, match="not a registered"):
        encode(Rogue(1))


def test_finished_property():
    assert not TokenEvent("j", [1]).finished
    assert TokenEvent("j", [1], finish_reason="stop").finished
    assert TokenEvent("j", [], error="x").finished


def test_continuation_counts_the_generated_tokens_in_the_prompt():
    job = _job(prompt_token_ids=[1, 2, 3, 9, 8], num_generated=2)
    assert job.prompt_len == 3
    with pytest.raises(ValueError, match="num_generated"):
        _job(prompt_token_ids=[1, 2], num_generated=2)
