"""`spectts train-heads`: MEDUSA-style draft heads for a checkpoint, trained on the frozen target
from its own generations (MEDUSA-2's self-distillation: no data set needed, only texts).

    spectts train-heads --bundle ~/orpheus-3b-0.1-ft --codec ~/snac_24khz --texts lines.txt \\
        --out ~/orpheus-heads
    spectts serve --bundle ~/orpheus-3b-0.1-ft --codec ~/snac_24khz --heads ~/orpheus-heads

1. Generate: the target speaks every line of --texts (each sentence its own prompt, the voices in
   turn) with the family's sampling (or --temperature) under the family's rule (Orpheus: the slot
   mask), capped as serving caps it.
2. Record: one causal forward of the target over each prompt + answer; its final hidden states are
   the heads' inputs.
3. Train: head k (1-based) at position t learns the target's distribution of token t + k + 1 (the
   target's logits at t + k), restricted to the ids the rule allows there: KL(target || head)
   (`--loss ce`: cross-entropy on the generated token instead). Only answer positions the target
   chose count (forced tokens are never proposed). The target is frozen; each head starts as its
   output layer behind an identity block (MEDUSA).
4. Measure on held-out answers each head's accuracy by rank (`accuracies[k][i]`: its rank-i allowed
   token was the generated one) and in the target's top-τ (`accuracies_tolerance`); they choose the
   serving tree. Write DIR (`models.heads_files`).
CUDA when there is one (heads trained in float32 under bf16 autocast), else the CPU (tiny models).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine.types import GenerationConfig
from models.bundle import HeadsSpec
from models.heads import DraftHeads
from models.llama import LlamaForCausalLM

TOP_RANKS = 10  # accuracies by rank, as the shipped voice's heads (models.voice.train_drafts)
TAU = 2  # tolerance accuracy: the head's token among the target's own top-τ


@dataclass
class Generations:
    """The target's answers, every sequence (prompt + answer) concatenated into N positions."""

    hidden: torch.Tensor  # (N, D) the target's final hidden states, its dtype, on its device
    tokens: torch.Tensor  # (N,) ids
    answer: torch.Tensor  # (N,) bool: generated (a forced token included)
    free: torch.Tensor  # (N,) bool: generated and chosen by the target (not forced)
    mask_of: torch.Tensor  # (N,) long: the allowed set here (index into allowed), -1: any
    allowed: list[torch.Tensor]  # per allowed set, its ids (A,) ascending
    seq: torch.Tensor  # (N,) long: which sequence

    def rows(self, k: int, seqs: torch.Tensor) -> torch.Tensor:
        """Positions t where head k trains: t + 1 is in an answer (t is the prompt's last token or
        later, where serving asks the heads), t + k + 1 is a free answer token of the same
        sequence, and that sequence is one of `seqs`. Its teacher is the target at t + k."""
        n = len(self.tokens) - k - 1
        if n <= 0:
            return torch.zeros(0, dtype=torch.long, device=self.tokens.device)
        t = torch.arange(n, device=self.tokens.device)
        ok = (self.answer[1:n + 1] & self.free[k + 1:] & (self.seq[:n] == self.seq[k + 1:])
              & torch.isin(self.seq[:n], seqs))
        return t[ok]

    def groups(self, positions: torch.Tensor):
        """(rows, ids): the positions' indices that share an allowed set, and its ids (None: any).
        Logits over those ids alone are the masked distribution (the Orpheus slot mask: 4096 of
        156940 ids), at a fraction of the cost."""
        m = self.mask_of[positions]
        for u in m.unique().tolist():
            yield (m == u).nonzero()[:, 0], (self.allowed[u] if u >= 0 else None)


def generate(tts, texts: list[str], voices: list[str], cfg: GenerationConfig
             ) -> list[tuple[list[int], list[int], object]]:
    """(prompt, answer, rule) of every sentence of every text, the voices in turn."""
    from engine.tts import decode_plans

    plans = [p for i, text in enumerate(texts)
             for p in tts.plan(text, voice=voices[i % len(voices)])]
    results = decode_plans(tts, plans, cfg)
    return [(p.prompt, r.tokens, tts.rule(p)) for p, r in zip(plans, results)]


@torch.no_grad()
def record(target: LlamaForCausalLM, sequences) -> Generations:
    """One causal forward of the target per sequence, and the rule's constraint at every answer
    position (walked along the answer as decoding walked it)."""
    device = target.lm_head.weight.device
    parts: dict[str, list] = {k: [] for k in ("hidden", "tokens", "answer", "free", "mask_of",
                                              "seq")}
    masks: dict[int, tuple[int, torch.Tensor]] = {}  # id of an allowed tensor -> index, tensor
    allowed: list[torch.Tensor] = []
    for i, (prompt, answer, rule) in enumerate(sequences):
        ids = torch.tensor([prompt + answer], device=device)
        parts["hidden"].append(target(ids)[0])  # (T, D)
        free, mask_of, state = [], [], rule.start()
        for token in answer:
            c = rule.constraint(state)
            free.append(c.forced is None)
            if c.allowed is None:
                mask_of.append(-1)
            else:
                if id(c.allowed) not in masks:  # (the tensor kept: its id stays its own)
                    masks[id(c.allowed)] = (len(allowed), c.allowed)
                    allowed.append(c.allowed.to(device).nonzero()[:, 0])
                mask_of.append(masks[id(c.allowed)][0])
            state = rule.advance(state, token)
        n = len(prompt)
        parts["tokens"].append(ids[0])
        parts["answer"].append(torch.tensor([False] * n + [True] * len(answer)))
        parts["free"].append(torch.tensor([False] * n + free, dtype=torch.bool))
        parts["mask_of"].append(torch.tensor([-1] * n + mask_of, dtype=torch.long))
        parts["seq"].append(torch.full((n + len(answer),), i, dtype=torch.long))
    return Generations(allowed=allowed, **{k: torch.cat(v).to(device) for k, v in parts.items()})


def new_heads(target: LlamaForCausalLM, num_heads: int) -> DraftHeads:
    """float32 heads on the target's device, each starting as the target's output layer."""
    cfg, weight = target.config, target.lm_head.weight
    heads = DraftHeads(num_heads, cfg.hidden_size, cfg.vocab_size).to(weight.device)
    with torch.no_grad():
        for head in heads.heads:
            head.out.weight.copy_(weight)
    return heads



def restricted(x: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    """x (n, D) -> float32 logits (n, A) over `ids` alone (all V when None)."""
    return F.linear(x, weight if ids is None else weight.index_select(0, ids)).float()


def head_loss(target: LlamaForCausalLM, head, k: int, data: Generations, t: torch.Tensor,
              loss: str) -> torch.Tensor:
    """Head k's (1-based) mean loss at positions t (see `Generations.rows`): KL(target || head)
    over the ids the rule allowed at t + k + 1, or ("ce") cross-entropy on the token there."""
    x = head.block(data.hidden[t].to(head.out.weight.dtype))  # (n, D)
    total = x.new_zeros((), dtype=torch.float32)
    for rows, ids in data.groups(t + k + 1):
        student = restricted(x[rows], head.out.weight, ids).log_softmax(-1)  # (n_g, A)
        if loss == "ce":
            token = data.tokens[t[rows] + k + 1]
            index = token if ids is None else torch.searchsorted(ids, token)
            total = total + F.nll_loss(student, index, reduction="sum")
            continue
        with torch.no_grad():
            teacher = restricted(data.hidden[t[rows] + k], target.lm_head.weight, ids)
            teacher = teacher.log_softmax(-1)  # (n_g, A)
        total = total + (teacher.exp() * (teacher - student)).sum()
    return total / max(len(t), 1)


@torch.no_grad()
def measure(target: LlamaForCausalLM, heads: DraftHeads, data: Generations, seqs: torch.Tensor,
            loss: str, chunk: int = 512) -> dict:
    """On the answers of `seqs`: each head's mean loss, accuracy by rank among the allowed ids
    (against the generated token) and in the target's top-τ there."""
    K = heads.num_heads
    hits, tol_hits = np.zeros((K, TOP_RANKS)), np.zeros((K, TOP_RANKS))
    counts, losses = np.zeros(K), np.zeros(K)
    for k, head in enumerate(heads.heads, start=1):
        rows = data.rows(k, seqs)
        for first in range(0, len(rows), chunk):
            t = rows[first:first + chunk]
            losses[k - 1] += float(head_loss(target, head, k, data, t, loss)) * len(t)
            x = head.block(data.hidden[t].to(head.out.weight.dtype))
            for g, ids in data.groups(t + k + 1):
                logits = restricted(x[g], head.out.weight, ids)  # (n_g, A)
                ranked = logits.topk(min(TOP_RANKS, logits.shape[-1]), -1).indices  # (n_g, R)
                top = restricted(data.hidden[t[g] + k], target.lm_head.weight, ids).topk(
                    min(TAU, logits.shape[-1]), -1).indices  # (n_g, τ)
                token = data.tokens[t[g] + k + 1]
                index = token if ids is None else torch.searchsorted(ids, token)
                r = ranked.shape[1]
                hits[k - 1, :r] += (ranked == index[:, None]).sum(0).cpu().numpy()
                in_top = (ranked[:, :, None] == top[:, None, :]).any(-1)  # (n_g, R)
                tol_hits[k - 1, :r] += in_top.sum(0).cpu().numpy()
            counts[k - 1] += len(t)
    n = np.maximum(counts, 1)
    return {"loss": (losses / n).round(5).tolist(),
            "accuracies": (hits / n[:, None]).round(4).tolist(),
            "accuracies_tolerance": (tol_hits / n[:, None]).round(4).tolist(),
            "top1": (hits[:, 0] / n).round(4).tolist(), "rows": counts.astype(int).tolist()}


def train(target: LlamaForCausalLM, data: Generations, train_seqs: torch.Tensor,
          num_heads: int = 4, steps: int = 1000, batch_rows: int = 256, lr: float = 1e-3,
          loss: str = "kl", seed: int = 0, log=None) -> tuple[DraftHeads, list[float]]:
    """Heads trained on the answers of `train_seqs` (AdamW, cosine decay); each step samples
    `batch_rows` positions per head. Returns the heads and each step's summed loss."""
    device = target.lm_head.weight.device
    target.requires_grad_(False)
    heads = new_heads(target, num_heads).train()
    pools = [data.rows(k, train_seqs) for k in range(1, num_heads + 1)]
    if not all(len(p) for p in pools):
        raise ValueError(f"the answers are too short to train {num_heads} heads (head k needs "
                         f"k + 1 generated tokens); give longer texts or fewer heads")
    opt = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator(device=device).manual_seed(seed)
    autocast = device.type == "cuda"
    history = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1)))
        rows = [p[torch.randint(len(p), (min(batch_rows, len(p)),), generator=gen, device=device)]
                for p in pools]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            total = sum(head_loss(target, h, k, data, t, loss)
                        for k, (h, t) in enumerate(zip(heads.heads, rows), start=1))
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(heads.parameters(), 1.0)
        opt.step()
        history.append(float(total.detach()))
        if log is not None and (step + 1) % max(1, steps // 20) == 0:
            log(f"step {step + 1}/{steps}: loss {history[-1]:.4f}")
    return heads.eval(), history


def split(n: int, valid_share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence indices for training and for measuring: the last ceil(share * n) are held out
    (with one sequence, it is both)."""
    held = min(n - 1, math.ceil(valid_share * n)) if n > 1 else 0
    seqs = torch.arange(n)
    return (seqs[:n - held], seqs[n - held:]) if held else (seqs, seqs)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train-heads", help="train draft heads for a checkpoint from its own "
                                                  "generations (MEDUSA-2 self-distillation)",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, help="the checkpoint (or a voice bundle)")
    p.add_argument("--codec", default=None, help="its codec directory (Orpheus: SNAC 24 kHz)")
    p.add_argument("--texts", required=True, help="a text file, one text per line")
    p.add_argument("--out", required=True, help="the heads directory to write")
    p.add_argument("--voices", default=None, help="comma-separated speakers taken in turn "
                                                  "(default: all of the checkpoint's)")
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-rows", type=int, default=256, help="positions per head per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--loss", choices=("kl", "ce"), default="kl",
                   help="kl: to the target's distributions; ce: on its generated tokens")
    p.add_argument("--temperature", type=float, default=None,
                   help="generation temperature (default: the family's sampling)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="cap per sentence (default: the family's)")
    p.add_argument("--valid-share", type=float, default=0.1, help="answers held out to measure")
    p.add_argument("--tree-nodes", type=int, default=64, help="candidates in the serving tree")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-batch", type=int, default=8, help="sentences generated together")
    p.add_argument("--max-len", type=int, default=4096, help="KV cache length per sequence")
    p.add_argument("--seed", type=int, default=0)
    return p


def cmd_train_heads(args: argparse.Namespace) -> int:
    from engine.orpheus_tts import load_tts
    from engine.threads import set_threads
    from models.heads_files import save_heads

    if args.threads:
        set_threads(args.threads)
    texts = [t for t in Path(args.texts).read_text(encoding="utf-8").splitlines() if t.strip()]
    if not texts:
        raise ValueError(f"{args.texts} has no text")
    if args.num_heads < 1 or args.steps < 1:
        raise ValueError("--num-heads and --steps must be >= 1")
    tts = load_tts(args.bundle, args.codec, device=args.device, max_batch=args.max_batch,
                   max_len=args.max_len)
    voices = args.voices.split(",") if args.voices else list(tts.voices)
    unknown = [v for v in voices if v not in tts.voices]
    if unknown:
        raise ValueError(f"unknown voices {unknown}; this checkpoint has {', '.join(tts.voices)}")
    sampling = tts.sampling_defaults
    if args.temperature is not None:
        sampling = replace(sampling, temperature=args.temperature)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens or 10**6, sampling=sampling,
                           seed=args.seed)
    start = time.perf_counter()
    sequences = generate(tts, texts, voices, cfg)
    answers = sum(len(a) for _, a, _ in sequences)
    _log(f"generated {answers} tokens for {len(sequences)} sentences in "
         f"{time.perf_counter() - start:.1f} s")
    target = tts.engine.target
    data = record(target, sequences)
    train_seqs, valid_seqs = (s.to(data.seq.device) for s in split(len(sequences),
                                                                    args.valid_share))
    heads, history = train(target, data, train_seqs, args.num_heads, args.steps,
                           args.batch_rows, args.lr, args.loss, args.seed, _log)
    metrics = measure(target, heads, data, valid_seqs, args.loss)
    metrics.update(sentences=len(sequences), answer_tokens=answers, steps=args.steps,
                   loss_kind=args.loss, first_losses=history[:5], last_losses=history[-5:],
                   held_out=len(valid_seqs) if len(valid_seqs) < len(sequences) else 0,
                   sampling=asdict(sampling))
    spec = HeadsSpec(num_heads=args.num_heads, accuracies=metrics["accuracies"],
                     accuracies_tolerance=metrics["accuracies_tolerance"],
                     tree_nodes=args.tree_nodes)
    save_heads(heads, args.out, spec, metrics, dtype=target.lm_head.weight.dtype)
    _log(f"wrote {args.out} (top-1 accuracy by head {metrics['top1']})")
    print(json.dumps({"out": str(args.out), **metrics}))
    return 0


def _log(message: str) -> None:
    print(f"train-heads: {message}", file=sys.stderr, flush=True)
