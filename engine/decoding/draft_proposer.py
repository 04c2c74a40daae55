"""A small draft decoder proposes a chain of γ tokens (SSD), batched over sequences, with its own
persistent cache. Forced tokens join the chain without a draft forward."""

from __future__ import annotations

import torch

from engine.decoding.sampling import distribution, draw, process
from engine.decoding.sequence import Sequence
from engine.decoding.speculative import Candidates
from models.kv_cache import KVCache
from models.runners import Runner


def chain(n: int) -> list[int]:
    return list(range(-1, n - 1))


def pad_blocks(blocks: list[list[int]], device: torch.device) -> torch.Tensor:
    """Token blocks of different lengths -> (B, T) ids, padded with 0."""
    T = max(len(b) for b in blocks)
    return torch.tensor([b + [0] * (T - len(b)) for b in blocks], dtype=torch.long, device=device)


@torch.inference_mode()
def propose_drafts(draft: Runner, cache: KVCache, seqs: list[Sequence],
                   room: list[int]) -> list[Candidates]:
    """Draft up to each sequence's γ tokens (at most `room[b]` candidates) after its last token.
    The draft cache ends holding every token fed to it (all but the last candidate)."""
    cands = [Candidates() for _ in seqs]
    feed = [s.tokens[cache.lengths[s.draft_slot]:] for s in seqs]
    states = [s.end_state for s in seqs]
    contexts = [list(s.tokens) for s in seqs]
    drafted = [0] * len(seqs)
    active = [b for b, s in enumerate(seqs) if min(s.cfg.gamma, room[b]) > 0]
    while active:
        slots = [seqs[b].draft_slot for b in active]
        layout = cache.layout(slots, [chain(len(feed[b])) for b in active])
        hidden = draft.forward(pad_blocks([feed[b] for b in active], cache.device), cache, layout)  # (A, T, D)
        last = torch.tensor([len(feed[b]) - 1 for b in active], device=hidden.device)
        logits = draft.logits(hidden[torch.arange(len(active), device=hidden.device), last]).cpu()
        for i, b in enumerate(active):
            s, c = seqs[b], cands[b]
            cache.commit(s.draft_slot, list(range(len(feed[b]))))
            s.stats.draft_forwards += 1
            params = s.cfg.sampling
            proc = process(logits[i], params, contexts[b], s.rule.constraint(states[b]).allowed)
            p = distribution(proc, params)  # the distribution the draft token is drawn from
            token = int(proc.argmax()) if params.greedy else draw(p, s.generator)
            states[b] = s.rule.advance(states[b], token)
            c.add(token, len(c) - 1, states[b], False, p)
            drafted[b] += 1
            feed[b] = [token]
            while len(c) < room[b] and (f := s.rule.constraint(states[b]).forced) is not None:
                states[b] = s.rule.advance(states[b], f)
                c.add(f, len(c) - 1, states[b], True)
                feed[b].append(f)
            contexts[b] += feed[b]
        active = [b for b in active if drafted[b] < seqs[b].cfg.gamma and len(cands[b]) < room[b]]
    return cands
