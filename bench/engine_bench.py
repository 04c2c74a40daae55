"""Engine benchmark: tokens/s of every decoding mode and of transformers' `generate`, side by side.

    .venv/bin/python -m bench.engine_bench [--bundle DIR] [--threads 1] [--max-new-tokens 300]

Without --bundle a random-weight bundle shaped like the default voice is used (its draft heads and
draft model are untrained, so acceptance is near zero: speed-ups need the trained voice). With a
bundle that has a token layout, prompts are `[BOS] phonemes [SEP]` and decoding follows the
interleaved rule (forced phonemes). Batch 1, CPU unless --device says otherwise. Prints a table and
writes JSON to bench/results/engine.json. `--compare-torch-forward` runs every mode a second time,
side by side, with decoding forwards in torch instead of the compiled decoder
(`Engine(runner="torch")`).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from engine.decoding.engine import Engine, resolve_device
from engine.decoding.sampling import SamplingParams
from engine.threads import set_threads
from engine.types import GenerationConfig, default_of
from models.kv_cache import KVCache
from models.voices.bundle import DEFAULT_VOICE, Bundle, load_bundle, random_bundle
from models.voices.rules import InterleavedRule, TokenRule
from server.model_registry import add_model_flags, chosen_model

MODES = [  # name, decoding, accept
    ("plain", "plain", "exact"),
    ("heads exact", "heads", "exact"),
    ("heads tolerance", "heads", "tolerance"),
    ("draft exact", "draft", "exact"),
    ("draft tolerance", "draft", "tolerance"),
]


def make_prompts(bundle: Bundle, n: int, length: int, seed: int
                 ) -> list[tuple[list[int], TokenRule | None]]:
    """A voice bundle: its frontend on held-out sentences; otherwise random token prompts."""
    if "frontend" in bundle.raw:
        from engine.tts import TextToSpeech
        from models.recipes.corpus import load_eval_sentences

        tts = TextToSpeech(bundle.path, max_batch=1)
        plans = [p for text in load_eval_sentences()[:n] for p in tts.plan(text)]
        return [(p.prompt, tts.rule(p)) for p in plans]
    gen = torch.Generator().manual_seed(seed)
    t = bundle.tokens
    out: list[tuple[list[int], TokenRule | None]] = []
    for _ in range(n):
        if t is None:
            out.append((torch.randint(0, bundle.target.config.vocab_size, (length,),
                                      generator=gen).tolist(), None))
            continue
        phonemes = torch.randint(t.phonemes[0], t.phonemes[1], (length,), generator=gen).tolist()
        allowed = torch.zeros(bundle.target.config.vocab_size, dtype=torch.bool)
        allowed[t.speech[0]:t.speech[1]] = True
        allowed[t.eop] = True
        out.append(([t.bos, *phonemes, t.sep], InterleavedRule(phonemes, allowed, t.eop, t.eos)))
    return out


def run_mode(engine: Engine, prompts, cfg: GenerationConfig) -> dict:
    engine.generate(prompts[0][0], cfg, prompts[0][1])  # warm-up
    rates, lengths, fwd_per_tok = [], [], []
    for prompt, rule in prompts:
        r = engine.generate(prompt, cfg, rule)
        rates.append(r.stats.tokens / r.stats.gen_seconds)
        lengths.append(r.stats.mean_accepted_length)
        fwd_per_tok.append(r.stats.target_forwards / r.stats.tokens)
    return {"tokens_per_s": statistics.median(rates),
            "mean_accepted_length": statistics.median(lengths),
            "target_forwards_per_token": statistics.median(fwd_per_tok)}


def run_transformers(bundle: Bundle, prompts, max_new: int, device: torch.device) -> dict | None:
    try:
        import transformers
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        bundle.target.save_pretrained(tmp)
        model = transformers.LlamaForCausalLM.from_pretrained(tmp, torch_dtype=torch.float32)
    model = model.to(device).eval()
    rates = []
    with torch.inference_mode():
        for i, (prompt, _) in enumerate([prompts[0], *prompts]):
            ids = torch.tensor([prompt], device=device)
            start = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new, min_new_tokens=max_new,
                                 pad_token_id=0)
            seconds = time.perf_counter() - start
            if i:  # the first run is a warm-up
                rates.append((out.shape[1] - ids.shape[1]) / seconds)
    return {"tokens_per_s": statistics.median(rates), "mean_accepted_length": 1.0,
            "target_forwards_per_token": 1.0}


@torch.inference_mode()
def forward_cost(engine: Engine, rows: list[int], batch: int = 1, context: int = 150,
                 repeats: int = 30) -> dict[int, float]:
    """Median ms of one target forward (logits of every row included) in which each of `batch`
    sequences with `context` cached tokens appends `rows` tokens as a chain: at batch 1 what verifying
    a tree of that size costs, with one row what a step of continuous batching costs."""
    run, cfg = engine.target_runner, engine.target.config
    cache = KVCache(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, context + max(rows),
                    cfg.head_dim, next(engine.target.parameters()).dtype, engine.device)
    slots = [cache.allocate() for _ in range(batch)]
    prefix = torch.zeros(batch, context, dtype=torch.long, device=engine.device)
    run.forward(prefix, cache, cache.layout(slots, [list(range(-1, context - 1))] * batch))
    for slot in slots:
        cache.commit(slot, list(range(context)))
    out = {}
    for n in rows:
        ids = torch.zeros(batch, n, dtype=torch.long, device=engine.device)
        layout = cache.layout(slots, [list(range(-1, n - 1))] * batch)
        run.forward(ids, cache, layout)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            engine.target.logits(run.forward(ids, cache, layout)).cpu()  # (B, n, V) in torch
            times.append(time.perf_counter() - t0)
        out[n] = 1000 * statistics.median(times)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bundle", default=None, help="a bundle (default: random weights)")
    add_model_flags(ap)  # --model NAME: a served model's bundle, by the server's names
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=300)
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=30)
    for name in ("tau", "beta", "min_ratio", "gamma"):  # the engine's defaults
        default = default_of(GenerationConfig, name)
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    ap.add_argument("--tree-nodes", default="", help="also sweep heads trees of these sizes, e.g. 4,8,16,32")
    ap.add_argument("--compare-torch-forward", action="store_true",
                    help="also run each mode with one-sequence forwards in torch (not numpy)")
    ap.add_argument("--out", default="bench/results/engine.json")
    args = ap.parse_args()
    if args.model or args.models:
        try:
            args.bundle = str(chosen_model(args, args.bundle or DEFAULT_VOICE).bundle)
        except ValueError as exc:
            ap.error(str(exc))
    set_threads(args.threads)
    device = resolve_device(args.device)

    if args.bundle:
        bundle = load_bundle(args.bundle, device)
    else:
        bundle = random_bundle(vocab_size=600, hidden_size=256, num_layers=5, num_heads=8,
                               num_kv_heads=4, intermediate_size=768, draft_layers=1,
                               num_draft_heads=4, std=0.05)
        bundle.target.to(device)
        bundle.draft.to(device)
        bundle.heads.to(device)
    engines = {"": Engine(copy.deepcopy(bundle) if args.compare_torch_forward else bundle,
                          max_batch=1, max_len=4096)}
    if args.compare_torch_forward:
        engines[" [torch fwd]"] = Engine(bundle, max_batch=1, max_len=4096, runner="torch")
    engine = engines[""]
    prompts = make_prompts(bundle, args.prompts, args.prompt_len, seed=0)
    # stop at the end of speech when a rule decides it; otherwise a fixed length for every mode
    stop = bundle.tokens is not None
    results: dict[str, dict] = {}
    for name, decoding, accept in tqdm(MODES, desc="modes"):
        if decoding == "heads" and bundle.heads is None or decoding == "draft" and bundle.draft is None:
            continue
        cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, decoding=decoding, accept=accept,
                               tau=args.tau, beta=args.beta, gamma=args.gamma, seed=0,
                               min_ratio=args.min_ratio,
                               stop_on_eos=stop, sampling=SamplingParams())
        for suffix, e in engines.items():
            results[name + suffix] = run_mode(e, prompts, cfg)
    for n in [int(x) for x in args.tree_nodes.split(",") if x]:
        for accept in ("exact", "tolerance"):
            tree = engine.heads_tree(accept, n)
            cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, decoding="heads",
                                   accept=accept, tau=args.tau, tree=tree, seed=0,
                                   min_ratio=args.min_ratio,
                                   stop_on_eos=stop, sampling=SamplingParams())
            for suffix, e in engines.items():
                results[f"heads {accept} {n} nodes{suffix}"] = run_mode(e, prompts, cfg)
    costs = {suffix: forward_cost(e, [1, 2, 4, 8, 17, 33]) for suffix, e in engines.items()}
    cost = costs[""]
    batched = {b: forward_cost(engine, [1], batch=b)[1] for b in (1, 4, 16, 32)}
    hf = run_transformers(bundle, prompts, args.max_new_tokens, device)
    if hf:
        results["transformers generate"] = hf

    base = results["plain"]["tokens_per_s"]
    params = sum(p.numel() for p in bundle.target.parameters())
    print(f"\nbundle: {args.bundle or 'random weights'} ({params / 1e6:.1f}M target params), "
          f"device {device}, runner {engine.runner}, torch threads {torch.get_num_threads()}, "
          f"batch 1, greedy, "
          f"{args.prompts} prompts, median of each")
    print(f"{'mode':36s} {'tokens/s':>10s} {'vs plain':>9s} {'accepted len':>13s} {'fwd/token':>10s}")
    for name, r in results.items():
        print(f"{name:36s} {r['tokens_per_s']:10.1f} {r['tokens_per_s'] / base:8.2f}x "
              f"{r['mean_accepted_length']:13.2f} {r['target_forwards_per_token']:10.3f}")
    for suffix, c in costs.items():
        print(f"one target forward{suffix}, batch 1, 150 cached tokens: "
              + ", ".join(f"{n} rows {ms:.2f} ms ({ms / c[1]:.2f}x)" for n, ms in c.items()))
    print("one target forward, B sequences of one new token each (continuous batching): "
          + ", ".join(f"B={b} {ms:.2f} ms ({ms / batched[1]:.2f}x)" for b, ms in batched.items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bundle": args.bundle, "device": str(device), "runner": engine.runner,
                               "threads": torch.get_num_threads(), "results": results,
                               "forward_ms_by_rows": costs, "forward_ms_by_batch": batched},
                              indent=2))


if __name__ == "__main__":
    main()
