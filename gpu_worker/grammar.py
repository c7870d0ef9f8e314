"""Structured output through llguidance: one matcher per constrained job, the
batch's token masks computed in one parallel call, on a GPU on a helper
thread while the model runs.

llguidance (not xgrammar or outlines-core) because it compiles a grammar in
about a millisecond with no per-schema precomputation (every request may
bring its own schema), drops the GIL while it computes masks (so the thread
overlaps the forward pass), and needs nothing else installed; see
benchmarks/grammar_libs.py and docs/engine.md for the comparison."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import structlog
import torch

from fastserve.gpu_worker.job_state import JobState

log = structlog.get_logger("fastserve.worker")


class Grammars:
    """overlap: compute the masks on a helper thread while the forward pass
    runs (on a GPU, whose forward leaves the CPU idle); without it they are
    computed when asked for (on a CPU device the forward already keeps every
    core busy, and a competing thread slows it more than the masks cost)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: tuple[int, ...], overlap: bool = True):
        import llguidance

        self._ll = llguidance
        eos = list(eos_token_ids) or None
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos)
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self.executor = llguidance.LLExecutor()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask") if overlap else None

    def matcher(self, grammar: str):
        """A matcher for one job. A grammar llguidance rejects leaves the
        matcher in its error state, which allows only EOS: that job ends,
        the batch goes on."""
        m = self._ll.LLMatcher(self.tokenizer, grammar, log_level=0)
        if m.is_error():
            log.warning("grammar rejected by the worker; the job will end at once", error=m.get_error())
        return m

    def start(self, states: list[JobState]) -> Future:
        """Advance each matcher past the output tokens fed since last time,
        then fill the (len(states), words) int32 bitmask of the next token;
        runs on the helper thread. Returns a future of the bitmask."""
        if self._thread is not None:
            return self._thread.submit(self._advance_and_fill, states)
        done: Future = Future()
        done.set_result(self._advance_and_fill(states))
        return done

    def _advance_and_fill(self, states: list[JobState]) -> torch.Tensor:
        for st in states:
            new = st.output(st.consumed)
            if new and not st.matcher.is_stopped():
                st.matcher.consume_tokens(new)
            st.consumed += len(new)
        bitmask = torch.zeros((len(states), self.words), dtype=torch.int32)
        self.executor.unsafe_compute_mask_ptr([(st.matcher, i) for i, st in enumerate(states)],
                                              bitmask.data_ptr(), self.words * 4, len(states))
        return bitmask
