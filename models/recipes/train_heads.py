"""MEDUSA-style draft heads for a checkpoint, trained on the frozen target from its own generations
(MEDUSA-2's self-distillation: no data set needed, only texts). `spectts train-heads` runs it:

    spectts train-heads --bundle ~/orpheus-3b-0.1-ft --codec ~/snac_24khz --texts lines.txt \\
        --out ~/orpheus-heads
    spectts serve --bundle ~/orpheus-3b-0.1-ft --codec ~/snac_24khz --heads ~/orpheus-heads

1. Generate (the engine's part: `engine.tts.generate_answers`): the target speaks every line of
   --texts (each sentence its own prompt, the voices in turn) with the family's sampling (or
   --temperature) under the family's rule (Orpheus: the slot mask), capped as serving caps it.
   This module takes the (prompt, answer, rule) triples from there.
2. Record: one causal forward of the target over each prompt + answer; its final hidden states are
   the heads' inputs.
3. Train: head k (1-based) at position t learns the target's distribution of token t + k + 1 (the
   target's logits at t + k), restricted to the ids the rule allows there: KL(target || head)
   (`--loss ce`: cross-entropy on the generated token instead). Only answer positions the target
   chose count (forced tokens are never proposed). The target is frozen; each head starts as its
   output layer behind an identity block (MEDUSA).
4. Measure on held-out answers each head's accuracy by rank (`accuracies[k][i]`: its rank-i allowed
   token was the generated one) and in the target's top-τ (`accuracies_tolerance`); they choose the
   serving tree. Write DIR (`models.voices.heads_files`).
CUDA when there is one (heads trained in float32 under bf16 autocast), else the CPU (tiny models).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.heads import DraftHeads
from models.llama import LlamaForCausalLM
from models.recipes.train_drafts import TOP_RANKS  # accuracies by rank, as the shipped voice's
from models.voices.bundle import HeadsSpec
from models.voices.bundle import new_heads as bundle_heads
from models.voices.heads_files import save_heads

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


def new_heads(target: LlamaForCausalLM, num_heads: int, shared_out: bool = False) -> DraftHeads:
    """float32 heads on the target's device: with `shared_out` all use the target's output layer
    (frozen), else each starts as a copy of it."""
    spec = HeadsSpec(num_heads=num_heads, shared_out=shared_out)
    heads = bundle_heads(target, spec, torch.float32)
    if not shared_out:
        with torch.no_grad():
            for head in heads.heads:
                head.out.weight.copy_(target.lm_head.weight)
    return heads


def restricted(x: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    """x (n, D) -> float32 logits (n, A) over `ids` alone (all V when None)."""
    return F.linear(x, weight if ids is None else weight.index_select(0, ids)).float()


def head_loss(target: LlamaForCausalLM, head, k: int, data: Generations, t: torch.Tensor,
              loss: str) -> torch.Tensor:
    """Head k's (1-based) mean loss at positions t (see `Generations.rows`): KL(target || head)
    over the ids the rule allowed at t + k + 1, or ("ce") cross-entropy on the token there."""
    x = head.block(data.hidden[t].to(head.block.linear.weight.dtype))  # (n, D)
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
            x = head.block(data.hidden[t].to(head.block.linear.weight.dtype))
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
          loss: str = "kl", seed: int = 0, log=None, shared_out: bool = False
          ) -> tuple[DraftHeads, list[float]]:
    """Heads trained on the answers of `train_seqs` (AdamW, cosine decay); each step samples
    `batch_rows` positions per head. Returns the heads and each step's summed loss."""
    device = target.lm_head.weight.device
    target.requires_grad_(False)
    heads = new_heads(target, num_heads, shared_out).train()
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


def train_heads(target: LlamaForCausalLM, sequences, out: str | Path, num_heads: int = 4,
                steps: int = 1000, batch_rows: int = 256, lr: float = 1e-3, loss: str = "kl",
                valid_share: float = 0.1, tree_nodes: int = 64, seed: int = 0, log=None,
                about: dict | None = None, shared_out: bool = False) -> dict:
    """Steps 2-4 on `sequences` ((prompt, answer, rule) of each sentence): record, train on all
    but the held-out share, measure on that share, write DIR `out` (heads in the target's dtype).
    `about`: how the answers were generated (e.g. the sampling), kept with the metrics. Returns
    the metrics written to DIR/heads.json. shared_out: the heads use the target's output layer
    (a 157k x 3072 layer per head would be 0.96 GB each in bf16)."""
    data = record(target, sequences)
    train_seqs, valid_seqs = (s.to(data.seq.device) for s in split(len(sequences), valid_share))
    heads, history = train(target, data, train_seqs, num_heads, steps, batch_rows, lr, loss, seed,
                           log, shared_out)
    metrics = measure(target, heads, data, valid_seqs, loss)
    metrics.update(sentences=len(sequences), answer_tokens=sum(len(a) for _, a, _ in sequences),
                   steps=steps, loss_kind=loss, first_losses=history[:5], last_losses=history[-5:],
                   held_out=len(valid_seqs) if len(valid_seqs) < len(sequences) else 0,
                   **(about or {}))
    spec = HeadsSpec(num_heads=num_heads, accuracies=metrics["accuracies"],
                     accuracies_tolerance=metrics["accuracies_tolerance"], tree_nodes=tree_nodes,
                     shared_out=shared_out)
    save_heads(heads, out, spec, metrics, dtype=target.lm_head.weight.dtype)
    return metrics
