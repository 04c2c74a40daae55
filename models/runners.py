"""Runners: how the engine executes a network's forwards, chosen once, when the engine loads.

- "torch": the model's one torch forward (`LlamaForCausalLM.forward`, `DraftHeads.forward`), on any
  device and dtype.
- "compiled-cpu": the compiled CPU kernels (`models.kernels`, numba) for the forwards of decoding:
  a forward of up to `CompiledDecoder.max_rows` real rows (a plain step, a speculative tree, a draft
  model's proposals, a continuous-batching step of several sequences) runs as one compiled call; a
  longer one (a prompt) goes through torch. Float32, bias-free weights on the CPU only: same numbers
  as torch up to float rounding, much less per-operation overhead on small models.

"auto" takes "compiled-cpu" where the model supports it, else "torch".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from models import kernels
from models.compiled_decoder import CompiledDecoder

if TYPE_CHECKING:
    from models.heads import DraftHeads
    from models.kv_cache import BlockLayout, KVCache
    from models.llama import LlamaForCausalLM

RUNNERS = ("torch", "compiled-cpu")


class Runner(Protocol):
    name: str

    def forward(self, input_ids: torch.Tensor, cache: KVCache, layout: BlockLayout) -> torch.Tensor:
        """input_ids (B, T) -> final hidden states (B, T, D); K/V written at the layout's places."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (R, D) -> float32 logits (R, V)."""


class TorchRunner:
    name = "torch"

    def __init__(self, model: LlamaForCausalLM) -> None:
        self.model = model.fuse_projections()

    def forward(self, input_ids: torch.Tensor, cache: KVCache, layout: BlockLayout) -> torch.Tensor:
        return self.model(input_ids, cache, layout)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden)


class CompiledCpuRunner:
    name = "compiled-cpu"

    def __init__(self, model: LlamaForCausalLM) -> None:
        self.model = model.fuse_projections()
        self.compiled = CompiledDecoder(self.model)

    def forward(self, input_ids: torch.Tensor, cache: KVCache, layout: BlockLayout) -> torch.Tensor:
        rows = input_ids.shape[1] if layout.rows is None else len(layout.rows[0])
        if rows <= self.compiled.max_rows:
            return self.compiled.forward(input_ids, cache, layout)
        return self.model(input_ids, cache, layout)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if len(hidden) <= self.compiled.max_rows:
            return self.compiled.logits(hidden)
        return self.model.logits(hidden)


class TorchHeads:
    name = "torch"

    def __init__(self, heads: DraftHeads) -> None:
        self.heads = heads

    def __call__(self, hidden: torch.Tensor, count: int | None = None) -> torch.Tensor:
        """hidden (B, D) -> logits (B, K, V) of the first `count` heads (see `DraftHeads.forward`)."""
        return self.heads(hidden, count)


class CompiledCpuHeads:
    """Every head in one compiled call (`models.kernels.draft_heads`): a dozen small torch linears
    cost more in dispatch than in arithmetic on the CPU."""

    name = "compiled-cpu"

    def __init__(self, heads: DraftHeads) -> None:
        if not supports(heads.heads[0].out.weight):
            raise ValueError("compiled heads run float32 weights on the CPU only")
        self.num_heads = heads.num_heads
        self.w_block = kernels.stacked(h.block.linear.weight for h in heads.heads)  # (K, D, D)
        self.b_block = kernels.stacked(h.block.linear.bias for h in heads.heads)  # (K, D)
        self.w_out = kernels.stacked(h.out.weight for h in heads.heads)  # (K, V, D)

    def __call__(self, hidden: torch.Tensor, count: int | None = None) -> torch.Tensor:
        k = self.num_heads if count is None else max(1, min(count, self.num_heads))
        out = np.empty((k, len(hidden), self.w_out.shape[1]), np.float32)  # (K, B, V)
        kernels.draft_heads(np.ascontiguousarray(hidden.numpy()), self.w_block[:k],
                            self.b_block[:k], self.w_out[:k], out)
        return torch.from_numpy(out).transpose(0, 1)  # (B, K, V)


def supports(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.float32


def resolve(kind: str, model: LlamaForCausalLM) -> str:
    """The runner `kind` ("auto" | "torch" | "compiled-cpu") means for this model; ValueError for
    "compiled-cpu" where the kernels cannot run it."""
    if kind == "auto":
        return "compiled-cpu" if CompiledDecoder.supports(model) else "torch"
    if kind not in RUNNERS:
        raise ValueError(f"unknown runner {kind!r}; expected auto or one of {RUNNERS}")
    if kind == "compiled-cpu" and not CompiledDecoder.supports(model):
        raise ValueError("the compiled CPU runner needs float32, bias-free weights on the CPU")
    return kind


def model_runner(kind: str, model: LlamaForCausalLM) -> Runner:
    """A resolved `kind`'s runner for `model` (fuses its weights: inference only); torch for a
    model the kernels cannot run (a draft model with biases next to a bias-free target)."""
    if kind == "compiled-cpu" and CompiledDecoder.supports(model):
        return CompiledCpuRunner(model)
    return TorchRunner(model)


def heads_runner(kind: str, heads: DraftHeads) -> TorchHeads | CompiledCpuHeads:
    if kind == "compiled-cpu" and supports(heads.heads[0].out.weight):
        return CompiledCpuHeads(heads)
    return TorchHeads(heads)
