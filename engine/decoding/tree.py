"""Sparse candidate trees for draft heads (MEDUSA / VADUSA).

A tree *shape* is a list of paths; a path (r1, r2, …, rd) names the candidate at depth d made of head
1's rank-r1 token, then head 2's rank-r2 token, and so on. Every prefix of a path is in the shape.
`sparse_tree` picks the shape that maximises the expected accepted length given each head's measured
top-k accuracies, greedily as MEDUSA does: the expected length of a shape is 1 (the bonus token) plus,
over its nodes, the product of the accuracies along the node's path.
"""

from __future__ import annotations

import heapq

Path = tuple[int, ...]


def validate_shape(shape: list[Path], num_heads: int) -> list[Path]:
    """Sorted copy of `shape`; ValueError if a prefix is missing or a path is deeper than the heads."""
    paths = sorted({tuple(int(r) for r in p) for p in shape}, key=lambda p: (len(p), p))
    known = set(paths)
    for p in paths:
        if not p:
            raise ValueError("a tree path cannot be empty")
        if len(p) > num_heads:
            raise ValueError(f"tree path {p} is deeper than the {num_heads} draft heads")
        if min(p) < 0:
            raise ValueError(f"tree path {p} has a negative rank")
        if len(p) > 1 and p[:-1] not in known:
            raise ValueError(f"tree path {p} lacks its parent {p[:-1]}")
    return paths


def sparse_tree(accuracies: list[list[float]], num_nodes: int) -> list[Path]:
    """Greedy best-first choice of `num_nodes` paths. accuracies[k][i]: how often head k+1's rank-i
    token is the right one (measured on held-out data)."""
    if num_nodes < 1:
        raise ValueError("a tree needs at least one node")
    heap = [(-acc, (rank,)) for rank, acc in enumerate(accuracies[0])]
    heapq.heapify(heap)
    chosen: list[Path] = []
    while heap and len(chosen) < num_nodes:
        neg, path = heapq.heappop(heap)
        chosen.append(path)
        depth = len(path)
        if depth < len(accuracies):
            for rank, acc in enumerate(accuracies[depth]):
                heapq.heappush(heap, (neg * acc, path + (rank,)))
    return validate_shape(chosen, len(accuracies))


def default_accuracies(num_heads: int, top_k: int = 10) -> list[list[float]]:
    """A prior for heads that have not been measured: accuracy falls with depth and with rank."""
    return [[0.6 * 0.8 ** k * 0.5 ** i for i in range(top_k)] for k in range(num_heads)]
