"""MEDUSA-style draft heads (VADUSA): head k predicts the token k places after the target's next token
from the target's last hidden state (after the final norm): a residual block h + SiLU(W h), then a
linear layer to the vocabulary."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models import kernels


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
        self.compiled: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # see `fuse`

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    def fuse(self, compiled: bool) -> DraftHeads:
        """For inference: with `compiled`, float32 heads on the CPU run as one compiled call
        (`models.kernels.draft_heads`; twelve torch linears cost ~1.3 ms a step there, mostly
        dispatch). Copies of the weights: call it after they are final, never while training."""
        first = self.heads[0].out.weight
        self.compiled = None
        if compiled and first.device.type == "cpu" and first.dtype == torch.float32:
            self.compiled = (kernels.stacked(h.block.linear.weight for h in self.heads),  # (K, D, D)
                             kernels.stacked(h.block.linear.bias for h in self.heads),  # (K, D)
                             kernels.stacked(h.out.weight for h in self.heads))  # (K, V, D)
        return self

    def forward(self, hidden: torch.Tensor, count: int | None = None) -> torch.Tensor:
        """hidden (B, D) -> logits (B, K, V); [:, k] predicts the token k+1 places after the next.
        count: run only the first `count` heads (K = count): a small tree reaches only so deep."""
        k = self.num_heads if count is None else max(1, min(count, self.num_heads))
        if (self.compiled is not None and not torch.is_grad_enabled()
                and hidden.device.type == "cpu" and hidden.dtype == torch.float32):
            w_block, b_block, w_out = (w[:k] for w in self.compiled)
            out = np.empty((k, len(hidden), len(w_out[0])), np.float32)  # (K, B, V)
            kernels.draft_heads(np.ascontiguousarray(hidden.numpy()), w_block, b_block, w_out, out)
            return torch.from_numpy(out).transpose(0, 1)
        return torch.stack([head(hidden) for head in self.heads[:k]], dim=1).float()
