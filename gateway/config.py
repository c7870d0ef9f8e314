"""GatewayConfig: every field is a `fastserve gateway` flag and a FASTSERVE_* variable."""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastserve.common import settings as S


def _h(text: str) -> dict:
    return {"help": text}


@dataclass(frozen=True)
class GatewayConfig:
    model: str = S.MODEL()
    served_model_name: str | None = S.SERVED_MODEL_NAME()
    broker: str = S.BROKER()
    namespace: str = S.NAMESPACE()
    host: str = S.HOST()
    port: int = S.PORT()
    api_key: str | None = S.API_KEY()
    instance_id: str = S.INSTANCE_ID()
    max_pending_requests: int = field(default=1024, metadata=_h("requests in flight at this gateway before 429"))
    max_n: int = field(default=16, metadata=_h("largest `n` (choices per request) accepted"))
    max_logprobs: int = field(default=20, metadata=_h("largest number of top logprobs a request may ask for"))
    health_timeout: float = S.HEALTH_TIMEOUT()
    request_timeout: float = S.REQUEST_TIMEOUT()
    queue_timeout: float = S.QUEUE_TIMEOUT()
    database: str = S.DATABASE()
    queue_concurrency: int = S.QUEUE_CONCURRENCY()
    result_retention: float = S.RESULT_RETENTION()
    require_backend: bool = field(default=True, metadata=_h(
        "refuse requests with 503 while the broker is unreachable"))
    log_level: str = S.LOG_LEVEL()

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model is required: a model directory with tokenizer.json (fastserve make-model makes one)")
        if not (Path(self.model) / "tokenizer.json").is_file():
            raise ValueError(f"model directory {self.model!r} has no tokenizer.json")
        if not self.served_model_name:
            object.__setattr__(self, "served_model_name", Path(self.model).resolve().name)
        if not self.instance_id:
            object.__setattr__(self, "instance_id", f"gw-{uuid.uuid4().hex[:8]}")
        S.validate(self)
        if any(not k for k in self.api_keys) and self.api_key is not None:
            raise ValueError("api_key must not contain empty keys")
        for name in ("max_pending_requests", "max_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be >= 0, got {self.max_logprobs}")

    @property
    def api_keys(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in (self.api_key or "").split(",")) if self.api_key else ()
