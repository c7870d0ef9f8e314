"""The engine on a CUDA device: greedy equivalence with transformers there,
and asynchronous KV copies (side stream, events, pinned host memory) that
leave the continuation unchanged. Skipped, with the reason shown, on machines
without CUDA (the CPU suite covers the same behaviour there)."""
import mmap

import pytest
import torch

from fastserve.gpu_worker.batch import SeqWork
from fastserve.gpu_worker.engine import Engine
from fastserve.llm import LLM
from fastserve.common.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
transformers = pytest.importorskip("transformers")

PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog.", "def main():\n    print('hi')"]
PARAMS = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_matches_transformers_on_cuda(make_tiny_model, arch):
    path = make_tiny_model(arch)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    outs = LLM(path, device="cuda", num_gpu_blocks=64).generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=12))
    for out in outs:
        with torch.no_grad():
            ref = hf.generate(torch.tensor([out.prompt_token_ids], device="cuda"), max_new_tokens=12,
                              do_sample=False, pad_token_id=1)[0, len(out.prompt_token_ids):].tolist()
        assert out.token_ids == ref


def _decode(engine, job, prompt, blocks, toks, n):
    for _ in range(n):
        done = len(prompt) + len(toks) - 1
        toks.append(engine.step([SeqWork(job, [toks[-1]], done, blocks, PARAMS, num_generated=len(toks))])[0].token_id)


@pytest.mark.parametrize("host_buffer", ["own", "mmap", "bytearray"])
@pytest.mark.parametrize("wait", [True, False])
def test_async_swap_keeps_the_continuation(tiny_model_dir, host_buffer, wait):
    probe_bytes = Engine(tiny_model_dir, device="cuda", num_gpu_blocks=1).bytes_per_block
    buf = {"own": None, "bytearray": bytearray(probe_bytes * 8), "mmap": mmap.mmap(-1, probe_bytes * 8)}[host_buffer]
    engine = Engine(tiny_model_dir, device="cuda", num_gpu_blocks=16, num_host_blocks=8 if buf is None else 0,
                    host_kv_buffer=buf)
    # Page-aligned memory (ours, or shared memory as the KV store maps it) is pinned:
    # copies are then truly asynchronous. A bytearray may be refused: still correct.
    assert engine.kv.host_pinned or host_buffer == "bytearray"
    prompt = engine.tokenizer.encode(PROMPTS[1] + " " + PROMPTS[2]).ids
    ref = [engine.step([SeqWork("r", prompt, 0, [0, 1, 2, 3], PARAMS)])[0].token_id]
    _decode(engine, "r", prompt, [0, 1, 2, 3], ref, 20)

    toks = [engine.step([SeqWork("j", prompt, 0, [4, 5, 6, 7], PARAMS)])[0].token_id]
    _decode(engine, "j", prompt, [4, 5, 6, 7], toks, 5)
    out = engine.copy_out([4, 5, 6, 7], [0, 1, 5, 6])
    if wait:
        out.wait()
    # Other work reuses the blocks: step() orders it after the copy out.
    engine.step([SeqWork("o", list(range(20, 60)), 0, [4, 5, 6, 7], PARAMS)])
    back = engine.copy_in([0, 1, 5, 6], [12, 9, 10, 15])
    if wait:
        back.wait()
        assert back.done() and out.done()
    _decode(engine, "j", prompt, [12, 9, 10, 15], toks, 15)
    assert toks == ref


def test_bfloat16_on_cuda_runs_close_to_float32(tiny_model_dir):
    ids = list(range(10, 40))
    f32 = Engine(tiny_model_dir, device="cuda", num_gpu_blocks=4).forward([SeqWork("a", ids, 0, [0, 1])])
    bf16 = Engine(tiny_model_dir, device="cuda", dtype="bfloat16", num_gpu_blocks=4).forward([SeqWork("a", ids, 0, [0, 1])])
    assert bf16.dtype == torch.float32
    assert (bf16 - f32).abs().max() < 0.05 * f32.abs().max()
