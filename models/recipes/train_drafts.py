"""Train the drafters of a trained speech LM: K draft heads (VADUSA, on the frozen LM's last hidden
state) and a small draft model (SSD: the target's first layers, distilled from its distribution).

    python -m models.recipes.train_drafts --lm checkpoints/lm/export --what heads --minutes 20
    python -m models.recipes.train_drafts --lm checkpoints/lm/export --what draft --minutes 20

Resumable (CKPT/heads.pt, CKPT/draft.pt). Head k (1-based) at position t predicts the token k + 1
places ahead (the LM itself predicts the next one). Validation writes each head's accuracy by rank —
acc[k][i] = P(head k's rank-i token is right) — which chooses the default candidate tree.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.heads import DraftHeads
from models.llama import LlamaForCausalLM
from models.recipes.train_lm import (batches, bf16_is_fast, collate, load_split, lr_at,
                                   save_checkpoint)
from models.voices.bundle import DRAFT_SHARES, draft_from_target

SHARES_FILE = "shares.json"  # an exported draft's parameters taken from the LM

TOP_RANKS = 10
TAU = 2  # tolerance accuracy (the default τ): is the head's token among the LM's own top-τ there?


def heads_loss(lm: LlamaForCausalLM, heads: DraftHeads, ids: torch.Tensor, mask: torch.Tensor,
               tau: int = 0) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]]:
    """Sum over heads of the cross-entropy at target positions; also each head's (logits, targets,
    the LM's own top-τ at the target position when tau > 0)."""
    with torch.no_grad():
        hidden = lm(ids)  # (B, T, D)
        lm_top = lm.logits(hidden).topk(tau, -1).indices if tau else None  # (B, T, τ)
    total, outs = 0.0, []
    T = ids.shape[1]
    for k, head in enumerate(heads.heads, start=1):
        ahead = k + 1
        if T <= ahead:
            break
        sel = mask[:, ahead:]  # head k at t predicts ids[t + k + 1]
        logits = head(hidden[:, :T - ahead][sel]).float()  # (N, V)
        targets = ids[:, ahead:][sel]
        total = total + F.cross_entropy(logits, targets)
        # the LM's prediction of ids[t + k + 1] is made at position t + k
        top = lm_top[:, k:T - 1][sel] if tau else None  # (N, τ)
        outs.append((logits, targets, top))
    return total, outs


def draft_loss(lm: LlamaForCausalLM, draft: LlamaForCausalLM, ids: torch.Tensor, mask: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KL(target || draft) at target positions (distillation), plus the draft's logits and the
    target's greedy tokens there."""
    sel = mask[:, 1:]
    with torch.no_grad():
        teacher = lm.logits(lm(ids[:, :-1])[sel])  # (N, V)
    student = draft.logits(draft(ids[:, :-1])[sel])
    loss = F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True,
                    reduction="batchmean")
    return loss, student, teacher.argmax(-1)


@torch.no_grad()
def evaluate(lm, model, what: str, valid, device) -> dict:
    model.eval()
    if what == "heads":
        hits = np.zeros((model.num_heads, TOP_RANKS))
        tol_hits = np.zeros((model.num_heads, TOP_RANKS))
        counts = np.zeros(model.num_heads)
        for idx in batches(valid, 16384, np.random.default_rng(0)):
            ids, mask = collate(valid, idx, device)
            _, outs = heads_loss(lm, model, ids, mask, tau=TAU)
            for k, (logits, targets, lm_top) in enumerate(outs):
                ranked = logits.topk(TOP_RANKS, -1).indices  # (N, R)
                hits[k] += (ranked == targets[:, None]).sum(0).cpu().numpy()
                in_top = (ranked[:, :, None] == lm_top[:, None, :]).any(-1)  # (N, R)
                tol_hits[k] += in_top.sum(0).cpu().numpy()
                counts[k] += len(targets)
        acc, tol = hits / counts[:, None], tol_hits / counts[:, None]
        model.train()
        return {"accuracies": acc.round(4).tolist(), "accuracies_tolerance": tol.round(4).tolist(),
                "top1": acc[:, 0].round(4).tolist(), "top5": acc[:, :5].sum(1).round(4).tolist(),
                "top1_in_lm_top3": tol[:, 0].round(4).tolist()}
    agree, n, kl = 0, 0, 0.0
    for idx in batches(valid, 16384, np.random.default_rng(0)):
        ids, mask = collate(valid, idx, device)
        loss, student, greedy = draft_loss(lm, model, ids, mask)
        agree += int((student.argmax(-1) == greedy).sum())
        n += len(greedy)
        kl += float(loss) * len(greedy)
    model.train()
    return {"greedy_agreement": agree / max(n, 1), "kl": kl / max(n, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--lm", type=Path, default=Path("checkpoints/lm/export"))
    ap.add_argument("--what", choices=["heads", "draft"], required=True)
    ap.add_argument("--data", type=Path, default=Path("data/voice"))
    ap.add_argument("--ckpt", type=Path, default=Path("checkpoints/drafts"))
    ap.add_argument("--num-heads", type=int, default=6)
    ap.add_argument("--draft-layers", type=int, default=1)
    ap.add_argument("--own-out", dest="shared_out", action="store_false",
                    help="heads: each its own output layer (default: all use the LM's, frozen)")
    ap.add_argument("--own-embeddings", dest="draft_shares", action="store_false",
                    help="draft: train its own embeddings and output layer (default: the LM's, "
                         "frozen, and left out of the export)")
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--total-steps", type=int, default=4000)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--export", type=Path, default=None, help="write the trained part here and exit")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="without a checkpoint, start from this bundle's heads / draft model (e.g. "
                         "the shipped voice, to follow a fine-tuned LM)")
    ap.add_argument("--save-every-minutes", type=float, default=3.0)
    ap.add_argument("--no-bf16", dest="bf16", action="store_false", default=None,
                    help="train in float32 (default: bfloat16 autocast where it is fast)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.bf16 = bf16_is_fast(device) if args.bf16 is None else args.bf16
    lm = LlamaForCausalLM.from_pretrained(args.lm, device)
    lm.requires_grad_(False)
    cfg = lm.config
    if args.what == "heads":
        model = DraftHeads(args.num_heads, cfg.hidden_size, cfg.vocab_size,
                           lm.lm_head if args.shared_out else None)
        if not args.shared_out:
            with torch.no_grad():  # start every head from the LM's own output layer
                for head in model.heads:
                    head.out.weight.copy_(lm.lm_head.weight)
    else:
        model = draft_from_target(lm, args.draft_layers)
    if args.init_from and not (args.ckpt / f"{args.what}.pt").exists():
        from safetensors.torch import load_file

        if args.what == "heads":
            model.load_state_dict({k: v.float() for k, v in
                                   load_file(str(args.init_from / "heads.safetensors")).items()})
        else:
            model = LlamaForCausalLM.from_pretrained(args.init_from / "draft")
        print(f"initialised {args.what} from {args.init_from}")
    model.to(device).train()
    model.requires_grad_(True)
    frozen = DRAFT_SHARES if args.what == "draft" and args.draft_shares else ()
    for name, param in model.named_parameters():
        param.requires_grad_(name not in frozen)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                            weight_decay=0.0)
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "metrics": None}
    args.ckpt.mkdir(parents=True, exist_ok=True)
    last = args.ckpt / f"{args.what}.pt"
    if last.exists():
        ck = torch.load(last, map_location=device, weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        state = ck["state"]
        print(f"resumed {args.what} at step {state['step']}")
    if args.export:
        export(model, args.what, state, args.export, frozen)
        return

    train, valid = load_split(args.data, "train"), load_split(args.data, "valid")
    start = saved_at = time.time()
    bar = tqdm(total=args.total_steps, initial=state["step"], desc=args.what)
    while state["step"] < args.total_steps and time.time() - start < args.minutes * 60:
        order = batches(train, args.batch_tokens, np.random.default_rng(100 + state["epoch"]))
        for bi in range(state["batch_in_epoch"], len(order)):
            for group in opt.param_groups:
                group["lr"] = lr_at(state["step"], args.lr, 100, args.total_steps)
            ids, mask = collate(train, order[bi], device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                if args.what == "heads":
                    loss, _ = heads_loss(lm, model, ids, mask)
                else:
                    loss, _, _ = draft_loss(lm, model, ids, mask)
                loss = loss.float()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            state["step"] += 1
            state["batch_in_epoch"] = bi + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if state["step"] % args.eval_every == 0:
                state["metrics"] = evaluate(lm, model, args.what, valid, device)
                tqdm.write(f"step {state['step']}: {json.dumps(state['metrics'])}")
            if time.time() - saved_at > args.save_every_minutes * 60:
                save_checkpoint(last, model, opt, state)
                saved_at = time.time()
            if state["step"] >= args.total_steps or time.time() - start > args.minutes * 60:
                break
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
    state["metrics"] = evaluate(lm, model, args.what, valid, device)
    print(json.dumps(state["metrics"]))
    save_checkpoint(last, model, opt, state)


def export(model, what: str, state: dict, out: Path, shares: tuple[str, ...] = ()) -> None:
    """heads -> OUT/heads.safetensors + OUT/heads.json (accuracies; whether they use the LM's
    output layer); draft -> OUT (HF Llama dir without the `shares` it takes from the LM, listed
    in OUT/shares.json)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    if what == "draft":
        model.eval().save_pretrained(out, leave_out=shares)
        (out / SHARES_FILE).write_text(json.dumps(list(shares)))
    else:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()},
                  str(out / "heads.safetensors"))
        (out / "heads.json").write_text(json.dumps({"num_heads": model.num_heads,
                                                    "shared_out": model.shared_out,
                                                    "metrics": state["metrics"]}, indent=1))
    print(f"exported {what} (step {state['step']}) to {out}")


if __name__ == "__main__":
    main()
