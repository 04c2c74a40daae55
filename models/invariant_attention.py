"""Batch-invariant attention: each query's output bits depend on that query and the keys it may see,
never on the other queries of the forward (half precision on the CPU, `KVCache.batch_invariant`).

Why: in bfloat16 (float16) the CPU's attention kernel blocks its sums over keys by the number of
queries in the call and by the masked keys beside a query's own, so a verify step (many queries, a
tree mask) gives a token other bits than the plain step (one query) that decodes it, and exact
speculation leaves plain greedy (docs/engine.md, 2026-12-07). float32 keeps one masked call per
forward (`KVCache.attend`).

How: every query runs as a one-query attention (q_len 1) over its visible keys — its sequence's
committed entries, then its tree ancestors and itself, in position order — padded with masked keys
to `padded(count)`, a length that depends on the query's own key count alone. The kernel computes
each (query, head) of a call on its own, with the same sums for the same keys, count and padding
whatever else the call holds, and a masked key adds exactly nothing (bench/bf16_rows.py checks
both), so a token's attention has the same bits in a plain step, a prompt, a draft chain or a tree,
and queries with the same padded length share one call. Queries whose visible keys are the first
entries of their slot (a plain step, a prompt, a chain) read the cache as a view; tree nodes and
views that would run past the buffer gather theirs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

KEY_BLOCK = 64  # visible keys are padded to a multiple of this: fewer calls, at most 63 masked keys


def batch_invariant(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether inference in `dtype` on `device` runs batch-invariant (this attention, and one-row
    projections as two: `llama.project`): half precision on the CPU. float32 keeps one masked
    call per forward: there a plain step and a verify differ by float32 rounding, which the exact
    modes' tests have not seen change a token. Off on CUDA, whose products pick their kernels by
    row count as well (not checked here): these two rules alone would not make a row's bits
    invariant there."""
    return dtype in (torch.bfloat16, torch.float16) and torch.device(device).type == "cpu"


def padded(count: int) -> int:
    return -(-count // KEY_BLOCK) * KEY_BLOCK


@dataclass(frozen=True)
class QueryGroup:
    """Queries of one forward that attend in one call: the same padded key length."""

    rows: torch.Tensor | None  # (n,) the queries' places among the forward's real rows; None: all
    slot: int  # >= 0: keys are this slot's first `length` entries (a view); -1: gathered by `index`
    index: torch.Tensor | None  # (n Hkv L,) gathered keys' rows in a layer's cache seen as
    # (max_batch Hkv max_len, hd); the padding's rows are other entries of the slot (masked)
    mask: torch.Tensor  # (n, 1, 1, L) bool, True = a key the query sees
    length: int  # L


def plan(blocks: list[tuple[int, int, np.ndarray]], kv_heads: int, max_len: int,
         device: torch.device) -> tuple[QueryGroup, ...]:
    """The groups of one forward. blocks: per sequence in row order, (slot, committed entries,
    ancestor mask (n, n) of its n new tokens: `kv_cache.ancestor_mask`)."""
    views: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (slot, L) -> [(row, count)]
    gathers: dict[int, list[tuple]] = {}  # L -> [(row, slot, committed entries, seen)]
    row = 0
    for slot, start, ancestors in blocks:
        for t in range(len(ancestors)):
            seen = np.flatnonzero(ancestors[t])  # block indices of its ancestors and itself
            count = start + len(seen)
            length = padded(count)
            if len(seen) == t + 1 and length <= max_len:  # entries [0, count) of its slot
                views.setdefault((slot, length), []).append((row, count))
            else:
                gathers.setdefault(length, []).append((row, slot, start, seen))
            row += 1
    groups = []
    for (slot, length), members in views.items():
        rows, counts = zip(*members)
        groups.append(_group(list(rows), slot, None, list(counts), length, row, device))
    for length, members in gathers.items():
        rows, slots, starts, seen = zip(*members)
        pos = np.tile(np.arange(length), (len(rows), 1))  # (n, L): the committed entries first,
        counts = []  # then the ancestors; the padding's keys are masked
        for i, (start, s) in enumerate(zip(starts, seen)):
            pos[i, start:start + len(s)] = start + s
            counts.append(start + len(s))
        pos = np.minimum(pos, max_len - 1)
        slots = np.asarray(slots)[:, None, None]
        heads = np.arange(kv_heads)[None, :, None]
        index = ((slots * kv_heads + heads) * max_len + pos[:, None, :]).reshape(-1)  # (n Hkv L,)
        groups.append(_group(list(rows), -1, torch.from_numpy(index).to(device), counts, length,
                             row, device))
    return tuple(groups)


def _group(rows: list[int], slot: int, index: torch.Tensor | None, counts: list[int], length: int,
           total: int, device: torch.device) -> QueryGroup:
    mask = np.arange(length)[None, :] < np.asarray(counts)[:, None]  # (n, L)
    return QueryGroup(rows=None if rows == list(range(total)) else torch.tensor(rows, device=device),
                      slot=slot, index=index, mask=torch.from_numpy(mask[:, None, None]).to(device),
                      length=length)


def attend(keys: torch.Tensor, values: torch.Tensor, q: torch.Tensor,
           groups: tuple[QueryGroup, ...]) -> torch.Tensor:
    """q (1, R, H, hd): the forward's real rows; keys, values (max_batch, Hkv, max_len, hd): a
    layer's cache with this forward's entries written. Returns (1, R, H, hd)."""
    R, H, hd = q.shape[1:]
    if len(groups) == 1 and groups[0].rows is None:
        return _call(keys, values, q[0, :, :, None], groups[0])[:, :, 0][None]
    out = q.new_empty(R, H, hd)
    for g in groups:
        out.index_copy_(0, g.rows, _call(keys, values, q[0].index_select(0, g.rows)[:, :, None],
                                         g)[:, :, 0])
    return out[None]


def _call(keys: torch.Tensor, values: torch.Tensor, q: torch.Tensor, g: QueryGroup) -> torch.Tensor:
    """q (n, H, 1, hd) -> (n, H, 1, hd): one attention call for a group."""
    n, H, _, hd = q.shape
    Hkv = keys.shape[1]
    if g.slot >= 0:  # (n, Hkv, L, hd) views of one slot's entries
        k = keys[g.slot, :, :g.length].expand(n, -1, -1, -1)
        v = values[g.slot, :, :g.length].expand(n, -1, -1, -1)
    else:
        k = keys.view(-1, hd).index_select(0, g.index).view(n, Hkv, g.length, hd)
        v = values.view(-1, hd).index_select(0, g.index).view(n, Hkv, g.length, hd)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=g.mask, enable_gqa=H != Hkv)
