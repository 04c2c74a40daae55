"""MEDUSA-style draft heads (VADUSA): head k predicts the token k places after the target's next token
from the target's last hidden state (after the final norm): a residual block h + SiLU(W h), then a
linear layer to the vocabulary."""

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
    def __init__(self, dim: int, vocab_size: int) -> None:
        super().__init__()
        self.block = ResBlock(dim)
        self.out = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.block(h))


class DraftHeads(nn.Module):
    """K independent heads (each its own parameters)."""

    def __init__(self, num_heads: int, dim: int, vocab_size: int) -> None:
        super().__init__()
        if num_heads < 1:
            raise ValueError("at least one draft head")
        self.heads = nn.ModuleList(DraftHead(dim, vocab_size) for _ in range(num_heads))

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    def forward(self, hidden: torch.Tensor, count: int | None = None) -> torch.Tensor:
        """hidden (B, D) -> logits (B, K, V); [:, k] predicts the token k+1 places after the next.
        count: run only the first `count` heads (K = count): a small tree reaches only so deep."""
        k = self.num_heads if count is None else max(1, min(count, self.num_heads))
        return torch.stack([head(hidden) for head in self.heads[:k]], dim=1).float()
