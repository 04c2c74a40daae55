"""What a forward of k rows costs against one row, for the voices' LM shapes (issue #20's regime).

    .venv/bin/python -m bench.rows_cost [--threads 1] [--repeats 30] [--context 200]

For each shape (`tts-1`: 256 wide, 6 layers; `tts-1-hd`: 512 wide, 6 layers, MLP 1536) and dtype
(float32; bfloat16 with the batch-invariant attention and projections that exact speculation needs
in half precision, `models.invariant_attention`; bfloat16 with one masked attention call, the
plain path), random weights, the engine's torch runner and KV cache: `--context` tokens committed,
then the median time of a forward of k new rows (a chain: a draft model's proposals or a plain step
for k = 1; a 16-node tree for "tree 16") over the same prefix, the block discarded after each.
Speculation pays where k rows cost little more than one: the ratios say how much.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from engine.threads import set_threads
from models.kv_cache import KVCache
from models.llama import LlamaConfig, LlamaForCausalLM, init_weights

SHAPES = {
    "tts-1": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=4),
    "tts-1-hd": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                     num_attention_heads=8, num_key_value_heads=4),
}
VOCAB = 4508  # the Festival voices' vocabulary (4375 speech codes, phonemes, controls)
TREE_16 = [-1, 0, 0, 0, 1, 1, 2, 3, 4, 4, 5, 6, 7, 8, 9, 10]  # a 16-node sparse tree's parents


def model_for(shape: dict, dtype: torch.dtype) -> LlamaForCausalLM:
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, **shape))
    init_weights(model, std=0.02, seed=0)
    return model.to(dtype).eval().fuse_projections()


def forward_ms(model: LlamaForCausalLM, cache: KVCache, parents: list[int], repeats: int) -> float:
    """Median ms of one forward (and its logits) of the block `parents` after the committed prefix."""
    ids = torch.randint(0, VOCAB, (1, len(parents)))
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 2):
            layout = cache.layout([0], [parents])
            start = time.perf_counter()
            model.logits(model(ids, cache, layout)[0])
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[2:])  # the first two warm the kernels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--context", type=int, default=200, help="committed tokens before the block")
    ap.add_argument("--shapes", default="tts-1,tts-1-hd")
    args = ap.parse_args()
    set_threads(args.threads)
    blocks = {"1": [-1], "2": [-1, 0], "4": [-1, 0, 1, 2], "8": list(range(-1, 7)),
              "tree 16": TREE_16}
    dtypes = [("float32", torch.float32, None), ("bf16 invariant", torch.bfloat16, True),
              ("bf16 one call", torch.bfloat16, False)]
    print(f"{args.threads} torch thread(s), {args.context} tokens of context, median of "
          f"{args.repeats}; ms for 1 row, then k rows / 1 row\n")
    print("| shape | params | dtype | 1 row | " + " | ".join(list(blocks)[1:]) + " |")
    print("|---|---|---|---|" + "---|" * (len(blocks) - 1))
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        for label, dtype, invariant in dtypes:
            model = model_for(shape, dtype)
            params = sum(p.numel() for p in model.parameters()) / 1e6
            cfg = model.config
            cache = KVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, args.context + 64,
                            cfg.hidden_size // cfg.num_attention_heads, dtype,
                            batch_invariant=invariant)
            with torch.inference_mode():  # the committed prefix
                prompt = torch.randint(0, VOCAB, (1, args.context))
                model(prompt, cache, cache.layout([0], [list(range(-1, args.context - 1))]))
            cache.lengths[0] = args.context
            ms = {k: forward_ms(model, cache, parents, args.repeats) for k, parents in blocks.items()}
            ratios = " | ".join(f"{ms[k] / ms['1']:.2f}×" for k in list(blocks)[1:])
            print(f"| {name} | {params:.1f}M | {label} | {ms['1']:.2f} ms | {ratios} |")


if __name__ == "__main__":
    main()
