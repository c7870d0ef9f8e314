"""What the gateway needs to know about the model: tokenizer, chat template,
context length. Read from the model directory, no weights, no torch."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastserve.common.tokenizer import ChatTemplate, load_tokenizer
from fastserve.gateway.tools import tool_parser_for


@dataclass
class ModelInfo:
    name: str
    tokenizer: Any  # tokenizers.Tokenizer
    chat_template: ChatTemplate | None
    max_model_len: int  # from config.json; the KV pool may allow less (JobTracker.max_model_len)
    vocab_size: int
    created: int
    bos_token: str | None = None
    eos_token: str | None = None
    tool_parser: str | None = None  # gateway/tools.py: "hermes" | "llama3_json" | None
    max_token_chars: int = 64  # the longest vocabulary entry: a text longer than this x max_model_len cannot fit
    _byte_tokenizer: Any = field(default=None, repr=False)

    @classmethod
    def load(cls, model_dir: str | Path, name: str) -> "ModelInfo":
        model_dir = Path(model_dir)
        tokenizer = load_tokenizer(model_dir)
        try:
            template = ChatTemplate.from_model_dir(model_dir)
        except (FileNotFoundError, ValueError):
            template = None  # /v1/chat/completions then answers 400
        cfg_path = model_dir / "config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        max_len = cfg.get("max_position_embeddings")
        tok_cfg_path = model_dir / "tokenizer_config.json"
        if max_len is None and tok_cfg_path.is_file():
            max_len = json.loads(tok_cfg_path.read_text()).get("model_max_length")
        if not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"{model_dir}: cannot tell the context length (no max_position_embeddings in config.json)")
        vocab = int(cfg.get("vocab_size") or tokenizer.get_vocab_size())
        tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.is_file() else {}
        created = int(cfg_path.stat().st_mtime) if cfg_path.is_file() else 0
        longest = max((len(t) for t in tokenizer.get_vocab(with_added_tokens=True)), default=1)
        return cls(name, tokenizer, template, max_len, vocab, created,
                   bos_token=_token_text(tok_cfg.get("bos_token")), eos_token=_token_text(tok_cfg.get("eos_token")),
                   tool_parser=tool_parser_for(template.source if template else None), max_token_chars=max(longest, 1))

    def too_long(self, text: str) -> bool:
        """True when `text` cannot fit the context whatever its tokens: every
        token covers at most `max_token_chars` characters. Checked before
        tokenizing, so a huge prompt costs nothing."""
        return len(text) > self.max_model_len * self.max_token_chars

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token as text (logprobs): may be a partial UTF-8 character."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (a byte-fallback or partial-character
        token's own bytes, not U+FFFD's), as llguidance's tokenizer view has them."""
        if self._byte_tokenizer is None:
            import llguidance

            self._byte_tokenizer = llguidance.LLTokenizer(self.tokenizer.to_str())
        return self._byte_tokenizer.decode_bytes([token_id])


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised as a dict
        return value.get("content")
    return value
