"""MEDUSA-style draft heads (VADUSA): head k predicts the token k places after the target's next token
from the target's last hidden state (after the final norm): a residual block h + SiLU(W h), then a
linear layer to the vocabulary — each head's own, or the target's output layer shared by all heads
(`shared_out`: the heads then hold K·D² parameters instead of K·(D² + V·D); for a small voice's 4.5k
vocabulary at D = 256 that is 0.4M instead of 7M, and for a 3B model's 157k vocabulary the difference
between 38M and 3.9G)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        nn.init.zeros_(self.linear.weight)  # starts as the identity, as MEDUSA does

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + F.silu(self.linear(h))


class DraftHead(nn.Module):
    def __init__(self, dim: int, vocab_size: int, shared_out: nn.Linear | None = None) -> None:
        super().__init__()
        self.block = ResBlock(dim)
        if shared_out is None:
            self.out = nn.Linear(dim, vocab_size, bias=False)
        else:  # the target's layer: used, never registered (not saved, trained or moved with us)
            object.__setattr__(self, "out", shared_out)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.block(h))


class DraftHeads(nn.Module):
    """K heads, each its own residual block; the output layer each head's own, or `shared_out` (the
    target's `lm_head`, shape (V, D)) for all."""

    def __init__(self, num_heads: int, dim: int, vocab_size: int,
                 shared_out: nn.Linear | None = None) -> None:
        super().__init__()
        if num_heads < 1:
            raise ValueError("at least one draft head")
        if shared_out is not None and tuple(shared_out.weight.shape) != (vocab_size, dim):
            raise ValueError(f"the shared output layer is {tuple(shared_out.weight.shape)}, "
                             f"heads need ({vocab_size}, {dim})")
        self.shared_out = shared_out is not None
        self.heads = nn.ModuleList(DraftHead(dim, vocab_size, shared_out) for _ in range(num_heads))

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    def forward(self, hidden: torch.Tensor, count: int | None = None) -> torch.Tensor:
        """hidden (B, D) -> logits (B, K, V); [:, k] predicts the token k+1 places after the next.
        count: run only the first `count` heads (K = count): a small tree reaches only so deep."""
        k = self.num_heads if count is None else max(1, min(count, self.num_heads))
        return torch.stack([head(hidden) for head in self.heads[:k]], dim=1).float()
