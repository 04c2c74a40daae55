"""Prefix reuse: key/value entries of prompt prefixes, kept after their sequence ends and copied into the
slot of the next sequence whose prompt starts the same way (a repeated text, a shared opening).

Prompts are cut into blocks of `block` tokens, as vLLM's automatic prefix caching does. Block i is keyed
by a hash chain over every token up to its end (so a block matches only under the same whole prefix) and
stored in a preallocated pool, evicted least recently used first. The keys and values of a prefix depend
on its tokens and positions only, so a reused prefix equals a recomputed one exactly.

Pool layout: (layers, capacity, kv_heads, block, head_dim) for keys and for values.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import torch

from models.kv_cache import KVCache


def block_keys(tokens: list[int], block: int) -> list[bytes]:
    """Hash-chain key of each whole block of `tokens`."""
    keys, h = [], b""
    for end in range(block, len(tokens) + 1, block):
        h = hashlib.blake2b(h + np.asarray(tokens[end - block:end], np.int64).tobytes(),
                            digest_size=16).digest()
        keys.append(h)
    return keys


class PrefixCache:
    def __init__(self, cache: KVCache, capacity_blocks: int, block: int = 16) -> None:
        if capacity_blocks < 1 or block < 1:
            raise ValueError("the prefix cache needs capacity_blocks >= 1 and block >= 1")
        layers, _, heads, _, head_dim = cache.k.shape
        shape = (layers, capacity_blocks, heads, block, head_dim)
        self.cache, self.block = cache, block
        self.k = torch.zeros(shape, dtype=cache.k.dtype, device=cache.device)
        self.v = torch.zeros(shape, dtype=cache.v.dtype, device=cache.device)
        self._where: OrderedDict[bytes, int] = OrderedDict()  # key -> pool index, LRU order
        self._free = list(range(capacity_blocks - 1, -1, -1))

    @property
    def blocks_in_use(self) -> int:
        return len(self._where)

    def load(self, slot: int, prompt: list[int]) -> int:
        """Copy the longest cached prefix of `prompt` into the empty `slot`; return its length in
        tokens. At least one prompt token is left to compute (its logits choose the first new one)."""
        if self.cache.lengths[slot]:
            raise ValueError("prefix reuse needs an empty slot")
        usable = (len(prompt) - 1) // self.block * self.block
        blocks = []
        for key in block_keys(prompt[:usable], self.block):
            index = self._where.get(key)
            if index is None:
                break
            blocks.append(key)
        self._touch(blocks)
        blocks = [self._where[key] for key in blocks]
        if not blocks:
            return 0
        n = len(blocks) * self.block
        idx = torch.tensor(blocks, device=self.k.device)
        # (layers, nb, Hkv, block, hd) -> (layers, Hkv, nb * block, hd)
        for pool, dest in ((self.k, self.cache.k), (self.v, self.cache.v)):
            got = pool.index_select(1, idx).permute(0, 2, 1, 3, 4)
            dest[:, slot, :, :n] = got.reshape(got.shape[0], got.shape[1], n, got.shape[-1])
        self.cache.lengths[slot] = n
        return n

    def save(self, slot: int, prompt: list[int]) -> None:
        """Keep the whole blocks of `prompt` (committed in `slot`) that the pool lacks."""
        n = min(len(prompt), self.cache.lengths[slot]) // self.block * self.block
        keys = block_keys(prompt[:n], self.block)
        for i, key in enumerate(keys):
            if key in self._where:
                continue
            if self._free:
                index = self._free.pop()
            else:  # evict the least recently used block
                _, index = self._where.popitem(last=False)
            lo = i * self.block
            self.k[:, index] = self.cache.k[:, slot, :, lo:lo + self.block]
            self.v[:, index] = self.cache.v[:, slot, :, lo:lo + self.block]
            self._where[key] = index
        self._touch(keys)

    def _touch(self, keys: list[bytes]) -> None:
        """Mark a chain used, its first block last: eviction then takes chains from their tails,
        never leaving a block that its missing predecessor makes unreachable before the others."""
        for key in reversed(keys):
            if key in self._where:  # a pool smaller than the chain evicts its own blocks
                self._where.move_to_end(key)
