"""What travels between the ranks of a split replica: batch descriptions and
results as msgpack (no pickle), and items whose description fits in the
fixed header or follows it."""
from fastserve.common.sampling_params import SamplingParams
from fastserve.gpu_worker.batch import SeqResult, SeqWork
from fastserve.gpu_worker.launch import spawn_local
from fastserve.gpu_worker.stage_wire import (HEADER_BYTES, Item, Kind, _pack, _unpack, decode_results,
                                             decode_work, encode_results, encode_work)
from pipeline_scenarios import wire_rank


def test_work_and_results_round_trip():
    seeded = SamplingParams(temperature=0.7, top_p=0.9, seed=3, max_tokens=5, stop_token_ids=(7, 9), logprobs=2)
    work = [SeqWork("a", [1, 2, 3], 0, [4, 5], seeded),
            SeqWork("b", [8], 41, [0, 1, 2], SamplingParams(temperature=0.0), num_generated=6),
            SeqWork("c", list(range(20)), 3, [9, 10], seeded, sample=False)]
    assert decode_work(encode_work(work)) == work
    results = [SeqResult("a", 5, -0.25, [(5, -0.25), (6, -2.0)]), SeqResult("b", 1, -1.5)]
    assert decode_results(encode_results(results)) == results


def test_header_carries_fields_and_short_descriptions():
    header, follows = _pack(Item(Kind.COPY, 42, b"abc", timings=[1, 2, 3, 4]), num_stages=2)
    assert header.numel() == HEADER_BYTES and follows is None
    item, rows, rest = _unpack(header, num_stages=2)
    assert (item.kind, item.seq, item.desc, item.timings, rows, rest) == (Kind.COPY, 42, b"abc", [1, 2, 3, 4], 0, 0)
    long = bytes(HEADER_BYTES)
    header, follows = _pack(Item(Kind.BATCH, 1, long), num_stages=2)
    assert follows is not None and follows.numel() == HEADER_BYTES
    item, _, rest = _unpack(header, num_stages=2)
    assert item.desc == b"" and rest == HEADER_BYTES


def test_descriptions_longer_than_the_header_cross_processes():
    sizes = [10, 3 * HEADER_BYTES + 5, 100]
    _, got = spawn_local(wire_rank, 1, 2, (sizes,), timeout=60)
    assert got == [[i, True, [1, 2, 3, 4], i, True, True, [5, 6, 7], True] for i in range(len(sizes))]
