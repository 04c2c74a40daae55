"""Candidates and their verification: the accept step shared by every decoding mode.

A step feeds the target one block per sequence: its *pending* tokens (generated, not yet in the cache;
the last of them is the *root*) followed by the candidates (a tree for draft heads, a chain for a draft
model, nothing for plain decoding). `verify` walks from the root down the candidates using the target's
logits at each visited node and returns the accepted path and the bonus token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Hashable

import torch

from engine.decoding.sampling import (SamplingParams, choose, distribution, draw, process, residual)
from engine.types import Accept, Decoding, GenerationConfig
from models.voices.rules import TokenRule


@dataclass
class Candidates:
    """Candidate tokens after the root. parents[i] < i, or -1 for a child of the root."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    states: list[Hashable] = field(default_factory=list)  # rule state after each candidate
    forced: list[bool] = field(default_factory=list)
    draft_probs: list[torch.Tensor | None] = field(default_factory=list)  # draft model: (V,) it sampled from

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, token: int, parent: int, state: Hashable, forced: bool,
            draft_prob: torch.Tensor | None = None) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.states.append(state)
        self.forced.append(forced)
        self.draft_probs.append(draft_prob)
        return len(self.tokens) - 1

    def depth(self, i: int) -> int:
        d = 0
        while i >= 0:
            i, d = self.parents[i], d + 1
        return d


@dataclass
class Verdict:
    path: list[int]  # accepted candidates, root to leaf
    bonus: int  # the target's own token after the path
    recovered: bool  # bonus drawn from the residual after a rejection


def verify(cands: Candidates, logits: torch.Tensor, context: list[int], root_state: Hashable,
           rule: TokenRule, cfg: GenerationConfig, decoding: str, gen: torch.Generator) -> Verdict:
    """logits (1 + len(cands), V) float32 on the CPU: row 0 at the root, row 1 + i at candidate i.
    `context`: every token up to and including the root."""
    children: list[list[int]] = [[] for _ in range(len(cands) + 1)]
    for i, p in enumerate(cands.parents):
        children[p + 1].append(i)
    params = cfg.sampling
    context = list(context)
    path: list[int] = []
    node, state = -1, root_state
    while True:
        kids = children[node + 1]
        constraint = rule.constraint(state)
        if constraint.forced is not None:
            nxt = next((k for k in kids if cands.tokens[k] == constraint.forced), None)
            if nxt is None:
                return Verdict(path, constraint.forced, False)
        else:
            proc = process(logits[node + 1], params, context, constraint.allowed)
            nxt, bonus, recovered = _judge(kids, cands, proc, params, cfg, decoding, gen)
            if nxt is None:
                return Verdict(path, bonus, recovered)
        path.append(nxt)
        context.append(cands.tokens[nxt])
        node, state = nxt, cands.states[nxt]


def top_tau(proc: torch.Tensor, tau: int, min_ratio: float = 0.0) -> list[int]:
    """The target's τ best tokens among the allowed ones, from processed logits (V,); with
    min_ratio > 0 only those whose probability is at least min_ratio x the best one's."""
    top = torch.topk(proc, min(tau, proc.shape[-1]))
    keep = torch.isfinite(top.values)
    if min_ratio > 0:  # p_i / p_1 = exp(l_i - l_1) at temperature 1
        keep &= top.values >= top.values[0] + math.log(min_ratio)
    return top.indices[keep].tolist()


def _judge(kids: list[int], cands: Candidates, proc: torch.Tensor, params: SamplingParams,
           cfg: GenerationConfig, decoding: str, gen: torch.Generator
           ) -> tuple[int | None, int, bool]:
    """Pick the accepted child among `kids` from the target's processed logits `proc` (V,), or
    return (None, bonus, recovered)."""
    if not kids:
        return None, choose(proc, params, gen), False
    token_of = {cands.tokens[k]: k for k in reversed(kids)}  # first-ranked child wins a tie
    if cfg.accept == Accept.EXACT or (cfg.accept == Accept.LOSSLESS and decoding == Decoding.HEADS):
        # the target's own choice (argmax, or one draw); accepted iff a child carries it. With a
        # sample this keeps the target's distribution exactly (the heads' lossless rule).
        own = choose(proc, params, gen)
        return token_of.get(own), own, False
    if decoding == Decoding.HEADS:  # tolerance τ (VADUSA)
        if params.greedy:
            allowed = top_tau(proc, cfg.tau, cfg.min_ratio)
        else:
            allowed = torch.multinomial(distribution(proc, params), cfg.tau, replacement=True,
                                        generator=gen).tolist()
        hit = next((k for k in kids if cands.tokens[k] in allowed), None)
        if hit is not None:
            return hit, -1, False
        return None, choose(proc, params, gen), False
    # draft model: one child, drawn from p = draft_probs
    (kid,) = kids
    token, p = cands.tokens[kid], cands.draft_probs[kid]
    if cfg.accept == Accept.LOSSLESS:
        if params.greedy:  # both distributions are one-hot: speculative sampling = exact match
            own = int(proc.argmax())
            return (kid, -1, False) if own == token else (None, own, False)
        q = distribution(proc, params)
        r = float(torch.rand(1, generator=gen))
        if r < min(1.0, float(q[token] / p[token])):
            return kid, -1, False
        return None, draw(residual(q, p), gen), True
    # tolerance β (SSD): r < min(1, q/p) + β, never outside the target's filtered support.
    # Greedy decoding judges with the target's temperature-1 distribution, and its support is the
    # target's top-τ (unfiltered, β alone would let any allowed token through 40% of the time).
    q = distribution(proc, params, temperature=params.temperature or 1.0)
    supported = (token in top_tau(proc, cfg.tau, cfg.min_ratio) if params.greedy
                 else bool(q[token] > 0))
    r = float(torch.rand(1, generator=gen))
    if supported and r < min(1.0, float(q[token] / p[token])) + cfg.beta:
        return kid, -1, False
    if params.greedy:
        return None, int(proc.argmax()), False
    return None, draw(residual(distribution(proc, params), p), gen), True
