"""The decoder's forward for ONE sequence on the CPU, in numpy: same math as `models.llama`, a quarter
of the per-operation cost.

On this project's CPUs a torch operation on a 256-wide vector costs 3-5 µs of dispatch before any
arithmetic, and MKL multiplies one row by a matrix about 1.6x slower than numpy's OpenBLAS; a
one-token forward of the shipped voice (6 layers, ~25 matrix products, ~200 operations) took 5.6 ms
through torch and 2.8 ms here (`bench/engine_bench.py --numpy-decode` side by side). So the single-
sequence forwards of decoding — plain steps, a speculative tree, a prompt — run here; batched forwards
(several sequences) stay in torch, whose packed rows and one big matmul per projection pay off there.

It reads the torch model's inference weights (`fuse_projections`) and writes the persistent
`engine.kv_cache.KVCache` in place, through numpy views of the same memory: nothing is copied, and
the engine's commit / rollback see the entries it wrote. Float32 only.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from engine.kv_cache import BlockLayout, KVCache
    from models.llama import LlamaForCausalLM


def matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x (T, in) @ w (in, out). OpenBLAS multiplies 2-3 rows about 4x slower than one row (another
    kernel): that few rows go one by one."""
    if 1 < len(x) <= 3:
        return np.stack([row @ w for row in x])
    return x @ w


class NumpyDecoder:
    # blocks of more rows go through torch, whose matmul wins there (a prompt, a large tree)
    max_rows = 8

    @staticmethod
    def supports(model: LlamaForCausalLM) -> bool:
        """Float32 weights on the CPU, no projection biases: what this forward implements."""
        weight, cfg = model.lm_head.weight, model.config
        return (weight.device.type == "cpu" and weight.dtype == torch.float32
                and not cfg.attention_bias and not cfg.mlp_bias)

    def __init__(self, model: LlamaForCausalLM) -> None:
        if not self.supports(model):
            raise ValueError("NumpyDecoder runs float32, bias-free models on the CPU only")
        cfg = model.config
        self.H, self.Hkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.eps, self.scale = cfg.rms_norm_eps, cfg.head_dim ** -0.5
        self.rotary = model.model.rotary
        self.embed = model.model.embed_tokens.weight.detach().numpy()  # (V, D)
        self.layers = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append((layer.input_layernorm.weight.detach().numpy(),  # (D,)
                                attn.qkv_t.numpy(),  # (D, (H + 2 Hkv) hd)
                                attn.o_t.numpy(),  # (H hd, D)
                                layer.post_attention_layernorm.weight.detach().numpy(),  # (D,)
                                mlp.gate_up_t.numpy(),  # (D, 2 I)
                                mlp.down_t.numpy()))  # (I, D)
        self.norm = model.model.norm.weight.detach().numpy()
        self.lm_head_t = model.lm_head_t.numpy()  # (D, V)

    def rms_norm(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        """x (T, D) -> x / sqrt(mean(x²) + eps) * weight. Each numpy call on a small array costs
        ~2 µs: one row takes its scale from a dot product and Python floats (3 calls, not 8)."""
        if len(x) == 1:
            scale = 1.0 / math.sqrt(float(x[0] @ x[0]) / x.shape[-1] + self.eps)
            return x * (np.float32(scale) * weight)
        return x * (1.0 / np.sqrt((x * x).sum(-1, keepdims=True) / x.shape[-1] + self.eps)) * weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (R, D) -> logits (R, V)."""
        return torch.from_numpy(matmul(hidden.numpy(), self.lm_head_t))

    def forward(self, input_ids: torch.Tensor, cache: KVCache, layout: BlockLayout) -> torch.Tensor:
        """input_ids (1, T) of one sequence (`layout.rows` is None) -> final hidden states (1, T, D).
        K/V of every input go into the cache at the layout's place; attention follows its mask."""
        H, Hkv, hd = self.H, self.Hkv, self.hd
        G, half = H // Hkv, hd // 2
        slot, start, T = layout.writes[0]
        S = layout.span
        if self.rotary.table.shape[0] < S:
            self.rotary(layout.positions, S)  # grows the table
        rows = self.rotary.table.numpy()[layout.positions[0].numpy()]  # (T, 2, hd)
        cos, sin = rows[:, None, 0], rows[:, None, 1]  # (T, 1, hd) each
        bias = None  # additive mask over the (G T, S) scores of each kv head: 0 or -inf
        if layout.attn_mask is not None:
            visible = np.tile(layout.attn_mask[0, 0].numpy(), (G, 1))  # (G T, S), rows g-major
            bias = np.where(visible, np.float32(0), np.float32(-np.inf))
        keys, values = cache.k.numpy(), cache.v.numpy()  # (layers, slots, Hkv, max_len, hd)
        x = self.embed[input_ids[0].numpy()]  # (T, D)
        for i, (w_in, qkv_t, o_t, w_post, gate_up_t, down_t) in enumerate(self.layers):
            qkv = matmul(self.rms_norm(x, w_in), qkv_t).reshape(T, H + 2 * Hkv, hd)
            qk = qkv[:, :H + Hkv]  # rotary on q and k together, as `apply_rotary`
            qk = qk * cos + np.concatenate((qk[..., half:], qk[..., :half]), -1) * sin
            kc, vc = keys[i, slot], values[i, slot]  # (Hkv, max_len, hd)
            kc[:, start:start + T] = qk[:, H:].transpose(1, 0, 2)
            vc[:, start:start + T] = qkv[:, H + Hkv:].transpose(1, 0, 2)
            q = qk[:, :H].reshape(T, Hkv, G, hd).transpose(1, 2, 0, 3).reshape(Hkv, G * T, hd)
            scores = (q @ kc[:, :S].transpose(0, 2, 1)) * self.scale  # (Hkv, G T, S)
            if bias is not None:
                scores += bias
            scores -= scores.max(-1, keepdims=True)  # softmax in place
            np.exp(scores, out=scores)
            scores /= scores.sum(-1, keepdims=True)
            out = scores @ vc[:, :S]  # (Hkv, G T, hd)
            out = out.reshape(Hkv, G, T, hd).transpose(2, 0, 1, 3).reshape(T, H * hd)
            x = x + matmul(out, o_t)
            gate_up = matmul(self.rms_norm(x, w_post), gate_up_t)  # (T, 2 I)
            inter = gate_up.shape[-1] // 2
            gate, up = gate_up[:, :inter], gate_up[:, inter:]  # slices: np.split costs ~50 µs
            # silu; exp(-g) clipped below float32's overflow (silu(g < -80) is 0 either way)
            x = x + matmul(gate / (1.0 + np.exp(-np.maximum(gate, -80.0))) * up, down_t)
        return torch.from_numpy(self.rms_norm(x, self.norm))[None]  # (1, T, D)
