"""Is bfloat16 inference on this CPU batch-invariant? (docs/engine.md, 2026-12-07)

    .venv/bin/python -m bench.bf16_rows

1. Whether `x @ W` in bf16 gives a row the same bits at 1 row as at M rows.
2. Whether SDPA in bf16 gives a query the same bits alone as beside other queries: in one
   one-query call per query group (`models.invariant_attention`), with masked padding keys of any
   content, and in the one masked call per forward that float32 keeps.
3. How often exact speculation (heads, draft) leaves plain greedy on a random bf16 model, as the
   engine runs it: batch-invariant (the engine's default in half precision on the CPU), or with
   its older single masked attention call, in bf16 or float32, one-row products run as two or not.
No timing: equality only.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import models.kv_cache as kv_cache
import models.llama as llama
from engine.decoding.engine import Engine
from engine.decoding.sampling import SamplingParams
from engine.types import GenerationConfig
from models import invariant_attention
from models.voices.bundle import random_bundle

SDPA, PROJECT, INVARIANT = (F.scaled_dot_product_attention, llama.project,
                            invariant_attention.batch_invariant)


def rows_table(shapes=((512, 1536), (1536, 512), (512, 4508), (3072, 1024)), rows: int = 24,
               trials: int = 20) -> None:
    """Per shape, in how many of `trials` random (x, W) row 0 of the product differs between
    M = 1 and some M in 2..rows, and between M = 2 and some M in 3..rows."""
    print(f"| (K, N) | M=1 differs from M>1 (of {trials}) | M=2 differs from M>2 |\n|---|---|---|")
    for k, n in shapes:
        diff1 = diff2 = 0
        for _ in range(trials):
            w = torch.randn(k, n, dtype=torch.bfloat16)
            x = torch.randn(1, rows, k, dtype=torch.bfloat16)
            one, two = torch.matmul(x[:, :1], w), torch.matmul(x[:, :2], w)[:, :1]
            diff1 += any(not torch.equal(torch.matmul(x[:, :m], w)[:, :1], one)
                         for m in range(2, rows))
            diff2 += any(not torch.equal(torch.matmul(x[:, :m], w)[:, :1], two)
                         for m in range(3, rows))
        print(f"| ({k}, {n}) | {diff1} | {diff2} |")


def attention_table(trials: int = 20, n: int = 9, heads: int = 8, kv_heads: int = 2,
                    head_dim: int = 64) -> None:
    """Per trial: n queries over one sequence's cached keys, each seeing its own count of them
    within one padded length L. Reference: each query alone, one-query SDPA over the cache's
    first L keys (a view), the keys past its count masked. Counted: trials where some query's
    output differs from its reference."""
    block = invariant_attention.KEY_BLOCK
    unpadded = in_group = zero_padding = one_call = 0
    for _ in range(trials):
        length = block * int(torch.randint(1, 10, ()))
        keys = torch.randn(1, kv_heads, length, head_dim, dtype=torch.bfloat16)
        values = torch.randn_like(keys)
        q = torch.randn(n, heads, 1, head_dim, dtype=torch.bfloat16)
        counts = torch.randint(length - block + 1, length + 1, (n,))
        mask = (torch.arange(length)[None] < counts[:, None])[:, None, None]  # (n, 1, 1, L)
        ref = torch.cat([SDPA(q[i:i + 1], keys, values, attn_mask=mask[i:i + 1], enable_gqa=True)
                         for i in range(n)])  # (n, H, 1, hd)
        group = SDPA(q, keys.expand(n, -1, -1, -1), values.expand(n, -1, -1, -1), attn_mask=mask,
                     enable_gqa=True)
        in_group += not torch.equal(group, ref)
        seen = mask[:, :, 0, :, None]  # (n, 1, L, 1)
        zeroed = SDPA(q, keys * seen, values * seen, attn_mask=mask, enable_gqa=True)
        zero_padding += not torch.equal(zeroed, ref)
        exact = torch.cat([SDPA(q[i:i + 1], keys[:, :, :c], values[:, :, :c], enable_gqa=True)
                           for i, c in enumerate(counts.tolist())])  # unpadded, unmasked
        unpadded += not torch.equal(exact, ref)
        together = SDPA(q.transpose(0, 2), keys, values, attn_mask=mask.transpose(0, 2),
                        enable_gqa=True).transpose(0, 2)  # (1, H, n, hd): q_len n, masked
        one_call += not torch.equal(together, ref)
    print(f"\n| a query's bf16 attention (H {heads}, Hkv {kv_heads}, hd {head_dim}, {n} queries, "
          f"keys padded to a multiple of {block} and masked) | differs from it alone "
          f"(of {trials}) |\n|---|---|\n"
          f"| in one call of {n} one-query attentions (`models.invariant_attention`) | {in_group} |\n"
          f"| with its masked padding keys and values zero instead of random | {zero_padding} |\n"
          f"| alone over exactly its own keys, unpadded and unmasked (another sum: so every "
          f"path pads alike) | {unpadded} |\n"
          f"| {n} queries in one masked call (q_len {n}: the engine's call in float32) | "
          f"{one_call} |")


def patched(invariant: bool, fp32_attention: bool = False, two_rows: bool = False) -> None:
    """invariant: the engine as it is; else its single masked attention call per forward, in
    float32 or bf16, with one-row products as two rows or not."""
    def sdpa(q, k, v, attn_mask=None, **kw):
        if fp32_attention and q.dtype != torch.float32:
            return SDPA(q.float(), k.float(), v.float(), attn_mask=attn_mask, **kw).to(q.dtype)
        return SDPA(q, k, v, attn_mask=attn_mask, **kw)

    def project(x, w, b):
        flat = x.reshape(-1, x.shape[-1])
        if two_rows and x.dtype == torch.bfloat16 and len(flat) == 1:
            y = torch.matmul(torch.cat([flat, flat]), w)[:1].reshape(*x.shape[:-1], w.shape[1])
        else:
            y = torch.matmul(x, w)
        return y if b is None else y + b

    kv_cache.F = F if invariant else type("F", (), {"scaled_dot_product_attention": staticmethod(sdpa)})
    llama.project = PROJECT if invariant else project
    invariant_attention.batch_invariant = INVARIANT if invariant else (lambda dtype, device: False)


def mismatches(prompts: int = 10, new: int = 100) -> int:
    b = random_bundle(vocab_size=300, hidden_size=128, num_layers=3, num_heads=4, num_kv_heads=2,
                      intermediate_size=1536, std=0.3, seed=5, eos_token_id=3)
    for m in (b.target, b.draft, b.heads):
        m.to(torch.bfloat16)
    engine = Engine(b, max_batch=2, max_len=300, runner="torch")
    greedy, bad = SamplingParams(temperature=0.0), 0
    for s in range(prompts):
        prompt = torch.randint(4, 300, (8,), generator=torch.Generator().manual_seed(s)).tolist()
        plain = engine.generate(prompt, GenerationConfig(max_new_tokens=new, sampling=greedy))
        for decoding in ("heads", "draft"):
            spec = engine.generate(prompt, GenerationConfig(max_new_tokens=new, sampling=greedy,
                                                            decoding=decoding))
            bad += spec.tokens != plain.tokens
    return bad


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows_table()
    attention_table()
    print("\n| attention | one-row products | exact decodes unequal to plain (of 20) |\n|---|---|---|")
    patched(True)
    print(f"| batch-invariant (`models.invariant_attention`) | as two rows (`llama.project`) | "
          f"{mismatches()} |")
    for fp32_attention, two_rows in ((False, False), (True, False), (False, True), (True, True)):
        patched(False, fp32_attention, two_rows)
        print(f"| one masked call, {'float32' if fp32_attention else 'bf16'} | "
              f"{'as two rows' if two_rows else 'one row'} | {mismatches()} |")
    patched(True)


if __name__ == "__main__":
    main()
