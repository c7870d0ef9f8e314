"""GatewayConfig: every field is a `fastserve gateway` flag and a FASTSERVE_* variable."""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path


def _h(text: str) -> dict:
    return {"help": text}


@dataclass(frozen=True)
class GatewayConfig:
    model: str = field(default="", metadata=_h("model directory (tokenizer.json, tokenizer_config.json, config.json)"))
    served_model_name: str = field(default="", metadata=_h("name clients send as `model` (default: the model directory's name)"))
    broker: str = field(default="memory://", metadata=_h("broker URL: amqp://user:pass@host:port/ or memory://"))
    namespace: str = field(default="", metadata=_h("prefix of every queue/exchange name (isolates deployments on one broker)"))
    host: str = field(default="0.0.0.0", metadata=_h("HTTP listen address"))
    port: int = field(default=8000, metadata=_h("HTTP port"))
    api_keys: tuple[str, ...] = field(default=(), metadata=_h("comma-separated API keys; empty: no authentication"))
    instance_id: str = field(default="", metadata=_h("this gateway's id (default: random); names its reply queue"))
    max_pending_requests: int = field(default=1024, metadata=_h("requests in flight at this gateway before 429"))
    max_n: int = field(default=16, metadata=_h("largest `n` (choices per request) accepted"))
    max_logprobs: int = field(default=20, metadata=_h("largest number of top logprobs a request may ask for"))
    health_timeout: float = field(default=10.0, metadata=_h("seconds without a heartbeat after which a scheduler/worker counts as gone"))
    require_backend: bool = field(default=True, metadata=_h("refuse requests with 503 when no scheduler has sent a heartbeat within health_timeout"))
    disconnect_poll: float = field(default=0.25, metadata=_h("seconds between checks whether a waiting client went away"))
    log_level: str = field(default="INFO", metadata=_h("log level"))

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model is required: a model directory with tokenizer.json (fastserve make-model makes one)")
        if not (Path(self.model) / "tokenizer.json").is_file():
            raise ValueError(f"model directory {self.model!r} has no tokenizer.json")
        if not self.served_model_name:
            object.__setattr__(self, "served_model_name", Path(self.model).resolve().name)
        if not self.instance_id:
            object.__setattr__(self, "instance_id", f"gw-{uuid.uuid4().hex[:8]}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if any(not k for k in self.api_keys):
            raise ValueError("api_keys must not contain empty keys")
        for name in ("max_pending_requests", "max_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be >= 0, got {self.max_logprobs}")
        if self.health_timeout <= 0 or self.disconnect_poll <= 0:
            raise ValueError("health_timeout and disconnect_poll must be > 0")
