"""The decoder's forward of a few rows on the CPU, compiled: the same math as `models.llama`, the
whole forward one call into `models.kernels` (numba). The "compiled-cpu" runner (`models.runners`)
sends the forwards of decoding here (up to `max_rows` real rows); a torch operation on a small model's
256-wide vectors costs microseconds of dispatch before any arithmetic, so a one-token forward of the
shipped voice takes several times longer through torch (measurements: docs/engine.md).

It reads the torch model's inference weights (`fuse_projections`; copied once, (out, in) and stacked
over layers) and writes the persistent `models.kv_cache.KVCache` in place, through numpy views of
the same memory: the engine's commit / rollback see the entries it wrote. Float32 only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from models import kernels

if TYPE_CHECKING:
    from models.kv_cache import BlockLayout, KVCache
    from models.llama import LlamaForCausalLM


class CompiledDecoder:
    # forwards of more rows (all sequences together) go through torch: a long prompt, a tree of 32
    # nodes, where the kernels no longer beat torch's matrix products (docs/engine.md)
    max_rows = 32

    @staticmethod
    def supports(model: LlamaForCausalLM) -> bool:
        """Float32 weights on the CPU, no projection biases: what this forward implements."""
        weight, cfg = model.lm_head.weight, model.config
        return (weight.device.type == "cpu" and weight.dtype == torch.float32
                and not cfg.attention_bias and not cfg.mlp_bias)

    def __init__(self, model: LlamaForCausalLM) -> None:
        if not self.supports(model):
            raise ValueError("CompiledDecoder runs float32, bias-free models on the CPU only")
        cfg = model.config
        self.H, self.Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.eps = cfg.rms_norm_eps
        self.rotary = model.model.rotary
        self.embed = model.model.embed_tokens.weight.detach().numpy()  # (V, D)
        layers = model.model.layers
        stack = kernels.stacked  # per layer -> (L, ...)
        # the fused projections (`fuse_projections`) keep (in, out); the kernels read (out, in)
        self.w_in = stack(layer.input_layernorm.weight for layer in layers)  # (L, D)
        self.w_qkv = stack(layer.self_attn.qkv_t.T for layer in layers)  # (L, (H + 2 Hkv) hd, D)
        self.w_o = stack(layer.self_attn.o_t.T for layer in layers)  # (L, D, H hd)
        self.w_post = stack(layer.post_attention_layernorm.weight for layer in layers)  # (L, D)
        self.w_gate_up = stack(layer.mlp.gate_up_t.T for layer in layers)  # (L, 2 I, D)
        self.w_down = stack(layer.mlp.down_t.T for layer in layers)  # (L, D, I)
        self.w_norm = model.model.norm.weight.detach().numpy()  # (D,)
        self.lm_head = model.lm_head.weight.detach().numpy()  # (V, D)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (R, D) -> logits (R, V)."""
        out = np.empty((len(hidden), len(self.lm_head)), np.float32)
        kernels.matmul_into(np.ascontiguousarray(hidden.numpy()), self.lm_head, out)
        return torch.from_numpy(out)

    def forward(self, input_ids: torch.Tensor, cache: KVCache, layout: BlockLayout) -> torch.Tensor:
        """input_ids (B, T) -> final hidden states (B, T, D), padding rows zero. K/V of every real
        token go into the cache at the layout's place; attention follows its mask."""
        B, T = input_ids.shape
        S = layout.span
        if self.rotary.table.shape[0] < S:
            self.rotary(layout.positions, S)  # grows the table
        ids, positions = input_ids.numpy().reshape(-1), layout.positions.numpy().reshape(-1)
        real = None if layout.rows is None else layout.rows[0].numpy()  # (R,) row b T + t
        if real is not None:
            ids, positions = ids[real], positions[real]
        if T == 1:  # each sequence's one token sees all its entries
            visible = np.ones((1, 0), np.uint8)
        else:
            mask = layout.attn_mask[:, 0].numpy().view(np.uint8)  # (B or slot range, T, S)
            if layout.members is not None:
                mask = mask[layout.members.numpy()]
            visible = mask.reshape(-1, S)
            if real is not None:
                visible = visible[real]
        rows = self.rotary.table.numpy()[positions]  # (R, 2, hd)
        slots, starts, lengths = np.array(layout.writes, np.int64).T.copy()  # (B,) each
        hidden = kernels.decoder_layers(
            self.embed[ids], np.ascontiguousarray(rows[:, 0]), np.ascontiguousarray(rows[:, 1]),
            np.ascontiguousarray(visible), cache.k.numpy(), cache.v.numpy(),
            np.concatenate(([0], np.cumsum(lengths))), slots, starts, self.w_in, self.w_qkv, self.w_o, self.w_post, self.w_gate_up, self.w_down,
            self.w_norm, self.eps, self.H, self.Hkv)  # (R, D)
        if real is None:
            return torch.from_numpy(hidden)[None]  # (1, T, D)
        out = np.zeros((B * T, hidden.shape[1]), np.float32)
        out[real] = hidden
        return torch.from_numpy(out).view(B, T, -1)
