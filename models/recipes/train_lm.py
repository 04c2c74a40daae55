"""Train the interleaved speech LM on the prepared shards, in resumable chunks.

    python -m models.recipes.train_lm --minutes 60 [--threads 1] [--data data/voice] [--ckpt checkpoints/lm]

Checkpoints (model, optimiser, step, data order) every few minutes to CKPT/last.pt and resumes from it;
the learning-rate schedule is defined over --total-steps, so chunks add up to one run. Validation loss
and top-1 / top-5 accuracy on speech tokens and end markers go to CKPT/log.jsonl. `--export DIR`
writes the model as a Hugging Face Llama directory.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.llama import LlamaConfig, LlamaForCausalLM, init_weights
from models.voices.interleaved import EOP, PAD, training_sequence, vocab_size

MODEL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
             num_key_value_heads=4, rope_theta=10000.0, max_position_embeddings=4096,
             rms_norm_eps=1e-5)


def load_split(data: Path, split: str) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for shard in sorted((data / "shards").glob(f"{split}-*.npz")):
        z = np.load(shard)
        po, to = z["phoneme_offsets"], z["token_offsets"]
        ph, du, tok = z["phonemes"], z["durations"], z["tokens"]
        for i in range(len(po) - 1):
            out.append(training_sequence(ph[po[i]:po[i + 1]], du[po[i]:po[i + 1]],
                                         tok[to[i]:to[i + 1]]))
    return out


def num_speech_tokens(data: Path) -> int:
    """The tokenizer's size: a learned codec's (tokenizer.json) or the k-means codebook's."""
    learned = data / "tokenizer.json"
    if learned.exists():
        return int(json.loads(learned.read_text())["num_codes"])
    return int(np.load(data / "codebook.npy").shape[0])


def batches(seqs: list[tuple[np.ndarray, np.ndarray]], max_tokens: int, rng: np.random.Generator
            ) -> list[list[int]]:
    """Length-bucketed batches of at most `max_tokens` padded tokens, in random order."""
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i][0]), rng.random()))
    out, cur, longest = [], [], 0
    for i in order:
        n = len(seqs[i][0])
        if cur and max(longest, n) * (len(cur) + 1) > max_tokens:
            out.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        out.append(cur)
    rng.shuffle(out)
    return out


def collate(seqs, idx: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(seqs[i][0]) for i in idx)
    ids = torch.full((len(idx), T), PAD, dtype=torch.long)
    mask = torch.zeros(len(idx), T, dtype=torch.bool)
    for row, i in enumerate(idx):
        a, m = seqs[i]
        ids[row, :len(a)] = torch.from_numpy(a)
        mask[row, :len(m)] = torch.from_numpy(m)
    return ids.to(device), mask.to(device)


def save_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict,
                    mirror: Path | None = None) -> None:
    """Model, optimiser and progress to `path`, atomically (a killed run leaves the previous one),
    and the same file into `mirror` (a copy outside the work tree) when given."""
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "state": state}, tmp)
    tmp.rename(path)
    if mirror is not None:
        mirror.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, mirror / "last.tmp")
        (mirror / "last.tmp").rename(mirror / path.name)


def bf16_is_fast(device: torch.device) -> bool:
    """bfloat16 autocast pays off on CUDA and on CPUs with AVX-512 or AMX; on an AVX2-only CPU it is
    emulated and one step took 30x longer than float32 here."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "AVX2", "NO AVX")


def step_loss(model: LlamaForCausalLM, ids: torch.Tensor, mask: torch.Tensor, bf16: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over target positions; also (logits, targets) at those positions.
    bf16: matmuls under bfloat16 autocast (weights and optimiser stay float32)."""
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        hidden = model(ids[:, :-1])  # (B, T-1, D)
        sel = mask[:, 1:]  # prediction at t is trained iff ids[t + 1] is a target
        logits = model.logits(hidden[sel])  # (N, V) float32
    targets = ids[:, 1:][sel]  # (N,)
    return F.cross_entropy(logits, targets), logits, targets


@torch.no_grad()
def evaluate(model, seqs, device, max_tokens: int = 16384) -> dict:
    model.eval()
    rng = np.random.default_rng(0)
    total = {"loss": 0.0, "n": 0, "top1": 0, "top5": 0, "eop_n": 0, "eop_top1": 0}
    for idx in batches(seqs, max_tokens, rng):
        ids, mask = collate(seqs, idx, device)
        loss, logits, targets = step_loss(model, ids, mask)
        top5 = logits.topk(5, dim=-1).indices
        hit1 = top5[:, 0] == targets
        total["loss"] += float(loss) * len(targets)
        total["n"] += len(targets)
        total["top1"] += int(hit1.sum())
        total["top5"] += int((top5 == targets[:, None]).any(-1).sum())
        eop = targets == EOP
        total["eop_n"] += int(eop.sum())
        total["eop_top1"] += int(hit1[eop].sum())
    model.train()
    n = max(total["n"], 1)
    return {"val_loss": total["loss"] / n, "val_top1": total["top1"] / n,
            "val_top5": total["top5"] / n, "val_eop_top1": total["eop_top1"] / max(total["eop_n"], 1)}


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("data/voice"))
    ap.add_argument("--ckpt", type=Path, default=Path("checkpoints/lm"))
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--total-steps", type=int, default=20000)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--save-every-minutes", type=float, default=4.0)
    ap.add_argument("--export", type=Path, default=None, help="write the model here and exit")
    ap.add_argument("--mirror", type=Path, default=None, help="a copy of each checkpoint goes here")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="without a checkpoint, start from these weights (a HF Llama dir)")
    ap.add_argument("--init-step", type=int, default=0, help="with --init-from: schedule step")
    ap.add_argument("--model", type=json.loads, default={},
                    help='LlamaConfig overrides of MODEL for a fresh run, e.g. \'{"hidden_size": 512}\'')
    ap.add_argument("--no-bf16", dest="bf16", action="store_false", default=None,
                    help="train in float32 (default: bfloat16 autocast where it is fast: CUDA, "
                         "AVX-512 CPUs, ~1.5x)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.bf16 = bf16_is_fast(device) if args.bf16 is None else args.bf16
    last = args.ckpt / "last.pt"
    ck = torch.load(last, map_location=device, weights_only=True) if last.exists() else None
    shape = (ck["state"].get("model") if ck else None) or {**MODEL, **args.model}  # a resume keeps its shape
    cfg = LlamaConfig(vocab_size=vocab_size(num_speech_tokens(args.data)), **shape)
    model = LlamaForCausalLM(cfg)
    init_weights(model, std=0.02, seed=0)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "seconds": 0.0, "model": shape}
    args.ckpt.mkdir(parents=True, exist_ok=True)
    if not last.exists() and args.init_from:  # e.g. the shipped voice's weights on a bare machine
        model.load_state_dict(LlamaForCausalLM.from_pretrained(args.init_from, device).state_dict())
        state["step"] = args.init_step
        print(f"initialised from {args.init_from}, schedule at step {args.init_step}")
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        state = {"model": shape, **ck["state"]}
        print(f"resumed at step {state['step']} (epoch {state['epoch']}, "
              f"{state['seconds'] / 3600:.2f} h trained)")
    if args.export:
        model.eval().save_pretrained(args.export)
        print(f"exported step {state['step']} to {args.export}")
        return

    train, valid = load_split(args.data, "train"), load_split(args.data, "valid")
    n_tokens = sum(len(s[0]) for s in train)
    print(f"{len(train)} train / {len(valid)} valid utterances, {n_tokens / 1e6:.1f}M train tokens, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {args.threads} threads")
    log = (args.ckpt / "log.jsonl").open("a")
    start = time.time()
    saved_at = start
    bar = tqdm(total=args.total_steps, initial=state["step"], desc="lm")
    done = False
    while not done and state["step"] < args.total_steps:
        order = batches(train, args.batch_tokens, np.random.default_rng(state["epoch"]))
        for bi in range(state["batch_in_epoch"], len(order)):
            t0 = time.time()
            for group in opt.param_groups:
                group["lr"] = lr_at(state["step"], args.lr, args.warmup, args.total_steps)
            ids, mask = collate(train, order[bi], device)
            loss, _, _ = step_loss(model, ids, mask, bf16=args.bf16)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            state["step"] += 1
            state["batch_in_epoch"] = bi + 1
            state["seconds"] += time.time() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", epoch=state["epoch"])
            if state["step"] % args.eval_every == 0:
                metrics = evaluate(model, valid, device)
                log.write(json.dumps({"step": state["step"], "epoch": state["epoch"],
                                      "train_loss": loss.item(), "hours": state["seconds"] / 3600,
                                      **metrics}) + "\n")
                log.flush()
                tqdm.write(f"step {state['step']}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            now = time.time()
            if now - saved_at > args.save_every_minutes * 60:
                save_checkpoint(last, model, opt, state, args.mirror)
                saved_at = now
            if now - start > args.minutes * 60 or state["step"] >= args.total_steps:
                done = True
                break
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
    save_checkpoint(last, model, opt, state, args.mirror)
    print(f"stopped at step {state['step']}, epoch {state['epoch']}: {evaluate(model, valid, device)}")


if __name__ == "__main__":
    main()
