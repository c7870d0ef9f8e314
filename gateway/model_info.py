"""What the gateway needs to know about the model: tokenizer, chat template,
context length. Read from the model directory, no weights, no torch."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastserve.common.tokenizer import ChatTemplate, load_tokenizer


@dataclass
class ModelInfo:
    name: str
    tokenizer: Any  # tokenizers.Tokenizer
    chat_template: ChatTemplate | None
    max_model_len: int
    vocab_size: int
    created: int
    max_token_chars: int = 64  # the longest vocabulary entry: a text longer than this x max_model_len cannot fit

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
        longest = max((len(t) for t in tokenizer.get_vocab(with_added_tokens=True)), default=1)
        return cls(name, tokenizer, template, max_len, vocab, int(cfg_path.stat().st_mtime) if cfg_path.is_file() else 0,
                   max_token_chars=max(longest, 1))

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
