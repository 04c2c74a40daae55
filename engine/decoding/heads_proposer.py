"""Draft heads propose a sparse candidate tree (VADUSA / MEDUSA)."""

from __future__ import annotations

import functools
from typing import Hashable, Sequence

import torch

from engine.decoding.speculative import Candidates
from engine.decoding.tree import Path
from models.voices.rules import TokenRule


@functools.lru_cache(maxsize=64)
def max_ranks(shape: tuple[Path, ...]) -> list[int]:
    """How many ranked tokens each depth of `shape` needs."""
    out: list[int] = []
    for path in shape:
        d = len(path) - 1
        out += [0] * (d + 1 - len(out))
        out[d] = max(out[d], path[-1] + 1)
    return out


def build_tree(head_logits: torch.Tensor, shape: Sequence[Path], rule: TokenRule,
               root_state: Hashable, offset: int, max_nodes: int | None = None) -> Candidates:
    """head_logits (K, V) float32 CPU, from the hidden state that chose the first pending token;
    head k (1-based) proposes the token k places after it. The root is the last pending token, `offset`
    places after the first, so a candidate at tree depth d comes from head offset + d.

    Paths through a forced position collapse onto the forced token; ranks are taken among the tokens
    the rule allows at that node; a path deeper than the heads reach is dropped. `max_nodes`: stop
    after that many candidates (the same first nodes as the whole tree's)."""
    num_heads = head_logits.shape[0]
    need = max_ranks(tuple(shape))  # once per tree shape, not per step (a tuple is its own tuple)
    ranked: dict[tuple[int, int], list[int]] = {}  # (head, id of allowed mask) -> tokens by rank
    cands = Candidates()
    node_of: dict[Path, int] = {(): -1}
    child_of: dict[tuple[int, int], int] = {}  # (parent, token) -> node
    for path in shape:
        if max_nodes is not None and len(cands) >= max_nodes:
            break
        parent = node_of.get(path[:-1])
        if parent is None:
            continue
        state = root_state if parent < 0 else cands.states[parent]
        constraint = rule.constraint(state)
        if constraint.forced is not None:
            token, forced = constraint.forced, True
        else:
            head = offset + len(path)
            if head > num_heads:
                continue
            key = (head, id(constraint.allowed))
            if key not in ranked:
                logits = head_logits[head - 1]
                if constraint.allowed is not None:
                    logits = logits.masked_fill(~constraint.allowed, float("-inf"))
                top = torch.topk(logits, min(need[len(path) - 1], logits.shape[-1]))
                ranked[key] = top.indices[torch.isfinite(top.values)].tolist()
            if path[-1] >= len(ranked[key]):
                continue
            token, forced = ranked[key][path[-1]], False
        existing = child_of.get((parent, token))
        if existing is None:
            existing = cands.add(token, parent, rule.advance(state, token), forced)
            child_of[(parent, token)] = existing
        node_of[path] = existing
    return cands
