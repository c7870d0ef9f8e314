"""The collectives of a tensor-parallel stage (Megatron-style): the embedding
is split by vocabulary rows, q/k/v and gate/up by output columns, o and down
by input columns; one all-reduce follows the embedding, attention and the MLP
of each layer, and the vocabulary-split logits are gathered on TP rank 0,
the rank that samples. With one rank every call is free."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class TPComm:
    def __init__(self, group=None, size: int = 1, rank: int = 0, leader: int = 0, host_staging: bool = False):
        """group: the stage's TP process group; rank: this rank's index in it;
        leader: the global rank of the group's TP rank 0; host_staging:
        device tensors cross a gloo group through host memory."""
        assert size == 1 or group is not None
        self.group, self.size, self.rank, self.leader = group, size, rank, leader
        self.host_staging = host_staging

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of the ranks' partial results, the same bits on every rank
        (gloo's and NCCL's all-reduce broadcast each reduced chunk from one
        rank), so the replicated residual stream never drifts apart."""
        if self.size > 1:
            import torch.distributed as dist

            y = x.cpu() if self.host_staging else x
            dist.all_reduce(y, group=self.group)
            if y is not x:
                x.copy_(y)
        return x

    def embed(self, token_ids: torch.Tensor, table: torch.Tensor, vocab: range) -> torch.Tensor:
        """Rows of a vocabulary-split embedding: each rank looks up the tokens
        in its rows and zeros the rest; the sum is exact (x + 0 = x)."""
        if self.size == 1:
            return F.embedding(token_ids, table)
        local = token_ids - vocab.start
        outside = (local < 0) | (local >= len(vocab))
        x = F.embedding(local.clamp(0, len(vocab) - 1), table)
        return self.all_reduce(x.masked_fill_(outside[:, None], 0))

    def gather_logits(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
        """(rows, vocab shard) per rank -> (rows, vocab_size) on TP rank 0, None elsewhere."""
        if self.size == 1:
            return logits
        if logits.shape[0] == 0:  # every rank sees the same batch, so all skip alike
            return logits.new_zeros((0, vocab_size)) if self.rank == 0 else None
        import torch.distributed as dist

        device = logits.device
        logits = logits.cpu() if self.host_staging else logits.contiguous()
        parts = [torch.empty_like(logits) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(logits, parts, dst=self.leader, group=self.group)
        if self.rank:
            return None
        return torch.cat(parts, dim=1)[:, :vocab_size].to(device)
