"""Is bfloat16 inference on this CPU batch-invariant? (docs/engine.md, 2026-12-07)

    .venv/bin/python -m bench.bf16_rows

1. Whether `x @ W` in bf16 (the engine's `project`) gives a row the same bits at 1 row as at M rows.
2. How often exact speculation (heads, draft) leaves plain greedy on a random bf16 model, as the
   engine runs it, with attention in float32 and one-row products run as two rows, or not.
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
from models.voices.bundle import random_bundle

SDPA, PROJECT = F.scaled_dot_product_attention, llama.project


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


def patched(fp32_attention: bool, two_rows: bool) -> None:
    def sdpa(q, k, v, attn_mask=None, **kw):
        if fp32_attention and q.dtype != torch.float32:
            return SDPA(q.float(), k.float(), v.float(), attn_mask=attn_mask, **kw).to(q.dtype)
        return SDPA(q, k, v, attn_mask=attn_mask, **kw)

    def project(x, w, b):
        flat = x.reshape(-1, x.shape[-1])
        if two_rows and x.dtype == torch.bfloat16 and len(flat) == 1:
            y = torch.matmul(torch.cat([flat, flat]), w)[:1].reshape(*x.shape[:-1], w.shape[1])
            return y if b is None else y + b
        return PROJECT(x, w, b)

    kv_cache.F = type("F", (), {"scaled_dot_product_attention": staticmethod(sdpa)})
    llama.project = project


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
    print("\n| attention | one-row products | exact decodes unequal to plain (of 20) |\n|---|---|---|")
    for fp32_attention, two_rows in ((False, False), (True, False), (False, True), (True, True)):
        patched(fp32_attention, two_rows)
        print(f"| {'float32' if fp32_attention else 'bf16'} | "
              f"{'as two rows' if two_rows else 'one row'} | {mismatches()} |")
    patched(False, False)


if __name__ == "__main__":
    main()
