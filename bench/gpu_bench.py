"""Engine bench on a random Orpheus-shaped model: plain vs draft vs heads, forward cost by rows.

    python -m bench.gpu_bench [--out results.json]     # CUDA: the real 3B shape in bf16
    python -m bench.gpu_bench --small                  # any device: tiny shapes (tests)

The model has orpheus-3b-0.1-ft's config (vocabulary 156940, hidden 3072, 28 layers, 24 / 8 heads,
intermediate 8192, tied embeddings, llama3 rope scaling) and random weights, built directly on the
device in bf16 (CUDA) or float32 (CPU): no checkpoint on disk. The draft model is the target's
first --draft-layers layers with its embeddings and norm (SSD's initialisation); the draft heads
are random. Random weights make acceptance meaningless for quality: the numbers are costs.
Prompts have Orpheus's layout and decoding follows its slot mask (`models.voices.orpheus`); greedy,
exact acceptance, a fixed number of new tokens. Prints markdown tables; writes JSON to --out (or
$OUT/gpu_bench.json when OUT is set).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from bench.engine_bench import forward_cost, run_mode
from engine.decoding.engine import Engine
from engine.decoding.sampling import SamplingParams
from engine.types import GenerationConfig
from models.heads import DraftHeads
from models.llama import LlamaConfig, LlamaForCausalLM, built, init_weights
from models.voices import orpheus
from models.voices.bundle import Bundle, HeadsSpec
from models.voices.random_orpheus import ORPHEUS_CONFIG

ORPHEUS_3B = {"hidden_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 24,
              "num_key_value_heads": 8, "intermediate_size": 8192}
SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 128}
ROWS = (1, 2, 4, 8, 16)


def build(shape: dict, draft_layers: int, num_heads: int, device: torch.device,
          dtype: torch.dtype, std: float = 0.02) -> Bundle:
    cfg = LlamaConfig.from_dict({**ORPHEUS_CONFIG, **shape})
    target = built(lambda: LlamaForCausalLM(cfg), device, dtype).eval()
    init_weights(target, std, seed=0)
    draft_cfg = LlamaConfig.from_dict({**ORPHEUS_CONFIG, **shape,
                                       "num_hidden_layers": draft_layers})
    draft = built(lambda: LlamaForCausalLM(draft_cfg), device, dtype).eval()
    own = draft.state_dict()
    draft.load_state_dict({k: v for k, v in target.state_dict().items() if k in own})
    heads = built(lambda: DraftHeads(num_heads, cfg.hidden_size, cfg.vocab_size), device,
                  dtype).eval()
    init_weights(heads, std, seed=1)
    return Bundle(path=Path("."), target=target, draft=draft, heads=heads,
                  heads_spec=HeadsSpec(num_heads=num_heads))


def prompts(n: int, text_tokens: int, seed: int = 0) -> list[tuple[list[int], orpheus.OrpheusRule]]:
    """Orpheus-layout prompts around random text ids, each with the slot mask."""
    gen = torch.Generator().manual_seed(seed)
    rule = orpheus.OrpheusRule(orpheus.slot_masks(ORPHEUS_CONFIG["vocab_size"]))
    out = []
    for _ in range(n):
        text = torch.randint(256, orpheus.BEGIN_OF_TEXT, (text_tokens,), generator=gen).tolist()
        out.append((orpheus.prompt_ids([orpheus.BEGIN_OF_TEXT, *text]), rule))
    return out


@torch.inference_mode()
def heads_cost(engine: Engine, repeats: int = 30) -> float:
    """Median ms of the draft heads on one hidden state (all heads), logits on the host."""
    hidden = torch.zeros(1, engine.target.config.hidden_size, device=engine.device,
                         dtype=engine.target.lm_head.weight.dtype)
    engine.heads(hidden).cpu()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.heads(hidden).cpu()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny shapes (hidden 64, 2 layers)")
    ap.add_argument("--device", default="auto", help="cuda | cpu | auto")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--text-tokens", type=int, default=20, help="random text ids per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="per prompt (default 210 = 30 frames; 28 with --small)")
    ap.add_argument("--draft-layers", type=int, default=2)
    ap.add_argument("--num-heads", type=int, default=4)
    ap.add_argument("--tree-nodes", type=int, default=16)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    max_new = args.max_new_tokens or (28 if args.small else 210)
    start = time.perf_counter()
    bundle = build(SMALL if args.small else ORPHEUS_3B, args.draft_layers, args.num_heads, device,
                   dtype)
    engine = Engine(bundle, max_batch=1, max_len=1024, stop_tokens=(orpheus.END_OF_SPEECH,))
    tree = engine.heads_tree("exact", args.tree_nodes)
    built_s = time.perf_counter() - start
    base = GenerationConfig(max_new_tokens=max_new, seed=0, stop_on_eos=False,
                            sampling=SamplingParams(), gamma=args.gamma)
    modes = {"plain": base, f"draft ({args.draft_layers} layers, γ {args.gamma})":
             GenerationConfig(**{**vars(base), "decoding": "draft"}),
             f"heads ({args.num_heads} random, {len(tree)}-node tree)":
             GenerationConfig(**{**vars(base), "decoding": "heads", "tree": tree})}
    work = prompts(args.prompts, args.text_tokens)
    results = {name: run_mode(engine, work, cfg) for name, cfg in modes.items()}
    target_ms = forward_cost(engine, list(ROWS))
    draft_ms = forward_cost(SimpleNamespace(target=bundle.draft, target_runner=engine.draft_runner,
                                            device=engine.device), list(ROWS))
    heads_ms = heads_cost(engine)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "runner": engine.runner, "small": args.small,
        "target_params": params(bundle.target), "draft_params": params(bundle.draft),
        "heads_params": params(bundle.heads), "build_seconds": round(built_s, 1),
        "max_new_tokens": max_new, "prompts": args.prompts, "results": results,
        "target_forward_ms_by_rows": target_ms, "draft_forward_ms_by_rows": draft_ms,
        "heads_ms": heads_ms,
        "peak_gpu_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                         if device.type == "cuda" else None)}
    plain = results["plain"]["tokens_per_s"]
    print(f"random Orpheus-shaped model, {report['target_params'] / 1e9:.2f} B parameters, "
          f"{report['dtype']} on {report['device']} (torch {torch.__version__}, runner "
          f"{engine.runner}), batch 1, greedy, "
          f"{args.prompts} prompts x {max_new} tokens, median of each\n")
    print(table([["mode", "tokens/s", "vs plain", "tokens / target forward"]]
                + [[name, f"{r['tokens_per_s']:.1f}", f"{r['tokens_per_s'] / plain:.2f}x",
                    f"{1 / r['target_forwards_per_token']:.2f}"] for name, r in results.items()]))
    print()
    print(table([["forward (150 cached tokens)", *(f"{n} rows" for n in ROWS)]]
                + [[f"{what} ms", *(f"{ms[n]:.2f} ({ms[n] / ms[1]:.2f}x)" for n in ROWS)]
                   for what, ms in (("target", target_ms), ("draft", draft_ms))]))
    print(f"\ndraft heads on one hidden state: {heads_ms:.2f} ms; built in {built_s:.1f} s"
          + (f"; peak GPU memory {report['peak_gpu_gib']:.1f} GiB" if report["peak_gpu_gib"]
             else ""))
    out = args.out or (os.path.join(os.environ["OUT"], "gpu_bench.json") if os.environ.get("OUT")
                       else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
