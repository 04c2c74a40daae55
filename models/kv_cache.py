"""Persistent key/value cache: preallocated once, one slot per sequence, reused across steps and requests.

Layout of each buffer: (layers, max_batch, kv_heads, max_len, head_dim). A slot's committed entries are
`[0, lengths[slot])`. A forward writes its block of new tokens right after them; the caller then keeps
only the accepted ones with `commit` (compacting a tree path into place) — entries past the committed
length are stale and are never attended to, they are simply overwritten by the next block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from models import invariant_attention


@dataclass(frozen=True)
class BlockLayout:
    """Where the new tokens of one forward go, their rotary positions and what each may attend to.

    B sequences, T = the longest block (shorter blocks are padded), S = span of cache read.
    """

    slots: torch.Tensor  # (B,) cache slot of each sequence
    slot_range: tuple[int, int] | None  # (first, last+1) of the slots read as one view (else gathered)
    members: torch.Tensor | None  # (B,) each sequence's place in slot_range when it has gaps
    positions: torch.Tensor  # (B, T) rotary position of each new token
    writes: list[tuple[int, int, int]]  # per sequence: (slot, first cache index, block length)
    rows: tuple[torch.Tensor, torch.Tensor] | None  # B > 1: see `KVCache.layout`
    attn_mask: torch.Tensor | None  # (B or range, 1, T, S) bool, True = may attend; None: all
    span: int  # S
    # batch-invariant attention's calls (`KVCache.batch_invariant`), else None
    queries: tuple[invariant_attention.QueryGroup, ...] | None = None


def ancestor_mask(parents: list[int]) -> np.ndarray:
    """parents[i] < i is the index of node i's parent inside the block, -1 for the cached prefix.
    Returns (n, n) bool: row i is True at i and at each of its ancestors (tree attention)."""
    n = len(parents)
    if parents == list(range(-1, n - 1)):  # a chain: causal
        return np.tri(n, dtype=bool)
    mask = np.zeros((n, n), dtype=bool)
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i] = mask[p]
        mask[i, i] = True
    return mask


def depths(parents: list[int]) -> list[int]:
    out: list[int] = []
    for p in parents:
        out.append(0 if p < 0 else out[p] + 1)
    return out


class KVCache:
    def __init__(self, num_layers: int, max_batch: int, num_kv_heads: int, max_len: int,
                 head_dim: int, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", batch_invariant: bool | None = None) -> None:
        """batch_invariant: attention gives each query the same bits whatever else the forward
        holds (`models.invariant_attention`), which exact speculation needs in half precision;
        None: where `invariant_attention.batch_invariant` says (half precision on the CPU)."""
        shape = (num_layers, max_batch, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_batch, self.max_len = max_batch, max_len
        self.device = torch.device(device)
        self.batch_invariant = (invariant_attention.batch_invariant(dtype, self.device)
                                if batch_invariant is None else batch_invariant)
        self.lengths = [0] * max_batch  # committed entries per slot
        self._free = list(range(max_batch - 1, -1, -1))

    # --- slots --------------------------------------------------------------------------------
    @property
    def slots_in_use(self) -> int:
        return self.max_batch - len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free KV cache slot")
        slot = min(self._free)  # the lowest free slot: active slots stay packed, so a batch's
        self._free.remove(slot)  # slots are often one range that attention reads as a view
        # (see also `pack`)
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        if slot in self._free:
            raise RuntimeError(f"slot {slot} released twice")
        self.lengths[slot] = 0
        self._free.append(slot)

    def move(self, slot: int, to: int) -> int:
        """Move a slot's committed entries into the free slot `to` (lower slots keep a batch's
        slots in one range, read as a view); the old slot is freed. Returns `to`."""
        if to not in self._free or slot in self._free:
            raise RuntimeError(f"cannot move slot {slot} to slot {to}")
        n = self.lengths[slot]
        self.k[:, to, :, :n] = self.k[:, slot, :, :n]
        self.v[:, to, :, :n] = self.v[:, slot, :, :n]
        self._free.remove(to)
        self.lengths[to] = n
        self.release(slot)
        return to

    def pack(self, slots: list[int]) -> list[int]:
        """Move these slots, lowest first, into free slots below them (`move`); returns each one's
        slot afterwards. Nothing to do, the usual case, costs one comparison."""
        if not slots or not self._free or min(self._free) > max(slots):
            return slots
        out = list(slots)
        for i in sorted(range(len(out)), key=out.__getitem__):
            free = min(self._free, default=self.max_batch)
            if free < out[i]:
                out[i] = self.move(out[i], free)
        return out

    # --- forward ------------------------------------------------------------------------------
    def layout(self, slots: list[int], parents: list[list[int]]) -> BlockLayout:
        """Layout for a block per slot; `parents[b]` gives the tree of slot b's new tokens
        (a chain is [-1, 0, 1, ...]). Each block is written right after the slot's committed entries."""
        B, T = len(slots), max(len(p) for p in parents)
        starts = [self.lengths[s] for s in slots]
        for s, start, par in zip(slots, starts, parents):
            if start + len(par) > self.max_len:
                raise ValueError(f"slot {s}: {start} cached + {len(par)} new tokens exceed "
                                 f"the cache length {self.max_len}")
        span = max(start + len(par) for start, par in zip(starts, parents))
        # attention reads the slots as one view when they span at most twice their number: the
        # gaps' slots ride along as idle rows (cheaper than gathering every sequence's entries)
        first, end = min(slots), max(slots) + 1
        viewed = end - first <= 2 * B
        gaps = viewed and slots != list(range(first, end))
        places = [s - first for s in slots] if gaps else list(range(B))
        # built in numpy (many small slices), handed to torch once
        positions = np.zeros((B, T), dtype=np.int64)
        mask = None  # one token of one sequence sees its whole prefix: no mask
        if not B == T == 1:
            mask = np.zeros((end - first if gaps else B, 1, T, span), dtype=bool)
            mask[:, 0, :, 0] = True  # padding and idle rows attend to one entry: softmax stays finite
        ancestors = ([ancestor_mask(par) for par in parents]
                     if mask is not None or self.batch_invariant else [])  # (n, n) each
        for b, (s, start, par) in enumerate(zip(slots, starts, parents)):
            n, i = len(par), places[b]
            positions[b, :n] = start + np.asarray(depths(par))
            if mask is not None:
                mask[i, 0, :n] = False
                mask[i, 0, :n, :start] = True
                mask[i, 0, :n, start:start + n] = ancestors[b]
        dev = self.device
        rows = None  # one sequence writes a slice (`writes`)
        if B > 1:  # the real rows, packed: each one's row in the (B T) block, and for each kv
            # head its row in a layer's cache seen as (max_batch Hkv max_len, hd)
            heads = self.k.shape[2]
            src = [b * T + t for b, par in enumerate(parents) for t in range(len(par))]
            dest = [(s * heads + h) * self.max_len + start + t
                    for s, start, par in zip(slots, starts, parents)
                    for t in range(len(par)) for h in range(heads)]
            rows = (torch.tensor(src, dtype=torch.long, device=dev),
                    torch.tensor(dest, dtype=torch.long, device=dev))
        return BlockLayout(slots=torch.tensor(slots, dtype=torch.long, device=dev),
                           slot_range=(first, end) if viewed else None,
                           members=torch.tensor(places, device=dev) if gaps else None,
                           positions=torch.from_numpy(positions).to(dev),
                           writes=[(s, start, len(par)) for s, start, par in zip(slots, starts, parents)],
                           rows=rows,
                           attn_mask=None if mask is None else torch.from_numpy(mask).to(dev),
                           span=span,
                           queries=invariant_attention.plan(list(zip(slots, starts, ancestors)),
                                                            self.k.shape[2], self.max_len, dev)
                           if self.batch_invariant else None)

    def write(self, layer: int, layout: BlockLayout, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the block's k, v into the cache: (1, T, Hkv, hd) for one sequence, (1, R, Hkv, hd)
        packed real rows for several (`rows`)."""
        kc, vc = self.k[layer], self.v[layer]  # (max_batch, Hkv, max_len, hd)
        if layout.rows is None:  # one sequence: a slice (no index tensors to build or read)
            slot, start, n = layout.writes[0]
            kc[slot, :, start:start + n] = k[0, :n].transpose(0, 1)
            vc[slot, :, start:start + n] = v[0, :n].transpose(0, 1)
        else:  # every real row of every sequence in one indexed copy
            dest = layout.rows[1]
            hd = k.shape[-1]
            kc.view(-1, hd).index_copy_(0, dest, k[0].reshape(-1, hd))
            vc.view(-1, hd).index_copy_(0, dest, v[0].reshape(-1, hd))

    def attend(self, layer: int, layout: BlockLayout, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
        """Write the block's k, v, then attend: q over the cached and new entries each token may see
        (the layout's mask). q (1, T, H, hd) for one sequence or (1, R, H, hd) packed real rows
        (k, v alike, with Hkv heads); returns the same shape as q. Batch-invariant: one
        one-query call per group of queries instead (`models.invariant_attention`)."""
        self.write(layer, layout, k, v)
        kc, vc = self.k[layer], self.v[layer]  # (max_batch, Hkv, max_len, hd)
        if layout.queries is not None:
            return invariant_attention.attend(kc, vc, q, layout.queries)
        if layout.slot_range is not None:  # the keys and values the block attends to,
            first, end = layout.slot_range  # (B or the slot range, Hkv, S, hd) each
            keys, values = kc[first:end, :, :layout.span], vc[first:end, :, :layout.span]
        else:
            keys, values = kc[layout.slots, :, :layout.span], vc[layout.slots, :, :layout.span]
        B, T = layout.positions.shape
        H, hd = q.shape[2:]
        if layout.rows is not None:  # unpack: (B, T) rows, padding zero
            q = q.new_zeros(B * T, H, hd).index_copy_(0, layout.rows[0], q[0]).view(B, T, H, hd)
        q = q.transpose(1, 2)  # (B, H, T, hd)
        if layout.members is not None:  # a slot range with gaps: idle rows for the gaps
            q = q.new_zeros((keys.shape[0], *q.shape[1:])).index_copy_(0, layout.members, q)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=layout.attn_mask,
                                             enable_gqa=H != keys.shape[1])
        if layout.members is not None:
            out = out.index_select(0, layout.members)
        out = out.transpose(1, 2)  # (B, T, H, hd)
        if layout.rows is None:
            return out
        return out.reshape(B * T, H, hd).index_select(0, layout.rows[0])[None]  # (1, R, H, hd)

    # --- after verification -------------------------------------------------------------------
    def commit(self, slot: int, keep: list[int]) -> None:
        """Keep the block entries `keep` (indices into the last block written to `slot`, in path
        order) as the next committed entries, dropping the rest of the block."""
        start = self.lengths[slot]
        n = len(keep)
        if start + n > self.max_len:
            raise ValueError("commit beyond the cache length")
        if keep != list(range(n)):
            src = torch.tensor([start + i for i in keep], device=self.device)
            # gather into a temporary first: source and destination ranges may overlap
            k_path = self.k[:, slot].index_select(2, src)  # (layers, Hkv, n, hd), a copy
            v_path = self.v[:, slot].index_select(2, src)
            self.k[:, slot, :, start:start + n] = k_path
            self.v[:, slot, :, start:start + n] = v_path
        self.lengths[slot] = start + n

    def truncate(self, slot: int, length: int) -> None:
        """Roll back: forget committed entries past `length`."""
        if length > self.lengths[slot]:
            raise ValueError("truncate can only shorten")
        self.lengths[slot] = length
