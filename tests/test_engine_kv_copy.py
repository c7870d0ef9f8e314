"""Copy a job's KV blocks out to the host pool, let other jobs overwrite the
device blocks, copy back into different blocks: the continuation is unchanged."""
import pytest
import torch

from fastserve.gpu_worker.batch import SeqWork
from fastserve.gpu_worker.engine import Engine
from fastserve.common.sampling_params import SamplingParams

PARAMS = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)


def run(engine, job, prompt, first_blocks, n_before, n_after, between=None, later_blocks=None):
    toks = []
    blocks = first_blocks
    for i in range(n_before + n_after):
        if i == n_before and between:
            blocks = between() or blocks
        if not toks:
            work = SeqWork(job, prompt, 0, blocks, PARAMS)
        else:
            work = SeqWork(job, [toks[-1]], len(prompt) + len(toks) - 1, blocks, PARAMS, num_generated=len(toks))
        toks.append(engine.step([work])[0].token_id)
    return toks


@pytest.mark.parametrize("host_buffer", ["own", "external"])
def test_copy_out_overwrite_copy_in_keeps_the_continuation(tiny_model_dir, host_buffer):
    probe = Engine(tiny_model_dir, num_gpu_blocks=16)
    buf = None if host_buffer == "own" else bytearray(probe.bytes_per_block * 8 + 100)
    engine = Engine(tiny_model_dir, num_gpu_blocks=16, num_host_blocks=8 if buf is None else 0, host_kv_buffer=buf)
    assert engine.num_host_blocks == 8
    prompt = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog. Hello, world!").ids
    assert len(prompt) > engine.block_size  # the job spans several blocks
    reference = run(engine, "ref", prompt, [0, 1, 2, 3], 6, 10)

    def swap():
        out = engine.copy_out([4, 5, 6], [7, 2, 3])  # host ids need not be ordered
        out.wait()
        assert out.done()
        before = engine.kv.gpu[:, :, [4, 5, 6]].clone()
        other = engine.tokenizer.encode("Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159 and more").ids
        engine.step([SeqWork("other", other[:48], 0, [4, 5, 6], PARAMS)])  # overwrite the job's blocks
        assert not torch.equal(before, engine.kv.gpu[:, :, [4, 5, 6]])
        back = engine.copy_in([7, 2, 3], [11, 9, 14])  # into different blocks
        back.wait()
        return [11, 9, 14]

    swapped = run(engine, "job", prompt, [4, 5, 6], 6, 10, between=swap)
    assert swapped == reference
    if buf is not None:  # the host pool really lives in the caller's buffer
        assert any(buf[engine.bytes_per_block * 7: engine.bytes_per_block * 8])


def test_swap_without_copy_in_changes_the_continuation(tiny_model_dir):
    """Control for the test above: continuing on blocks that were overwritten
    and not restored does change the output, so the equality above is earned."""
    engine = Engine(tiny_model_dir, num_gpu_blocks=16)
    prompt = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog. Hello, world!").ids
    reference = run(engine, "ref", prompt, [0, 1, 2, 3], 6, 10)

    def clobber():
        other = engine.tokenizer.encode("Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159 and more").ids
        engine.step([SeqWork("other", other[:48], 0, [4, 5, 6], PARAMS)])

    assert run(engine, "job", prompt, [4, 5, 6], 6, 10, between=clobber) != reference


def test_copy_rejects_bad_block_ids(tiny_model_dir):
    engine = Engine(tiny_model_dir, num_gpu_blocks=4, num_host_blocks=2)
    with pytest.raises(ValueError, match="host block id"):
        engine.copy_out([0], [2])
    with pytest.raises(ValueError, match="GPU block id"):
        engine.copy_in([0], [4])
    with pytest.raises(ValueError, match="1 GPU blocks but 2 host blocks"):
        engine.copy_out([0], [0, 1])
    with pytest.raises(ValueError, match="fewer than num_host_blocks"):
        Engine(tiny_model_dir, num_gpu_blocks=4, num_host_blocks=3, host_kv_buffer=bytearray(engine.bytes_per_block * 2))


def test_seeded_sampling_survives_a_swap(tiny_model_dir):
    """A seeded, temperature-1 job swapped out and back into other blocks in
    the middle of its generation yields the tokens it yields untouched."""
    engine = Engine(tiny_model_dir, num_gpu_blocks=16, num_host_blocks=4)
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=11, max_tokens=64, ignore_eos=True)
    prompt = engine.tokenizer.encode("Hello, world! How are you today?").ids

    def generate(swap_at=None):
        blocks, toks = [0, 1, 2], []
        for i in range(16):
            if i == swap_at:
                engine.copy_out(blocks, [0, 1, 2]).wait()
                engine.step([SeqWork("x", list(range(40, 80)), 0, blocks, params)])  # clobber
                engine.copy_in([0, 1, 2], [13, 7, 10]).wait()
                blocks = [13, 7, 10]
            new, done = (prompt, 0) if not toks else ([toks[-1]], len(prompt) + len(toks) - 1)
            toks.append(engine.step([SeqWork("j", new, done, blocks, params, num_generated=len(toks))])[0].token_id)
        return toks

    untouched = generate()
    assert generate(swap_at=7) == untouched
    assert len(set(untouched)) > 3  # really sampled, not a greedy loop
