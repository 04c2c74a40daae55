"""The step plan: what one engine step does for each sequence, decided before anything runs.

As vLLM's `SchedulerOutput`: the planner reads a plain view of each sequence (`SeqView`) and returns,
per sequence, how many of its pending tokens the step writes, whether that is only a slice of its
prompt, how many candidates it may draft, and which forward it joins (`StepPlan`). The engine then
only executes the plan (propose, one forward per group, verify) and commits (`Engine.step`).

Inputs are in priority order (the caller's: `engine.serving.deadlines.Policy.select` for the
service, submission order offline). Three budgets shape the step:
- prefill_chunk > 0: the step writes at most that many prompt tokens in all, so newcomers' prompts
  never stall the running sequences for long, even when several arrive together: prompts are served
  in priority order; one with more pending than the budget has left writes the next part of it, one
  with nothing left sits this step out;
- row_budget > 0: the step's candidate rows (pending tokens included) are capped by giving each
  speculating sequence at most (budget - pending) / speculators candidates: under load small trees
  keep a batched forward cheap; alone, a sequence gets its whole tree;
- forward groups: blocks are split into padded forwards minimising padding plus a per-forward
  overhead (`plan_forwards`), so a newcomer's prompt chunk is not padded onto every running
  sequence's one-token block.

No torch: plain policy, tested on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

# a forward costs about as much as this many more real rows, whatever its size (CPU, small model)
FORWARD_OVERHEAD_ROWS = 12
# a padding row costs this share of a real row: real rows alone go through the projections (packed),
# padding exists only inside attention
PADDING_ROW_COST = 0.25


@dataclass(frozen=True)
class SeqView:
    """What the planner knows of one sequence."""

    pending: int  # tokens not yet in the cache (its prompt's rest, or the last generated token)
    room: int  # cache entries left after the pending tokens (negative: they do not fit)
    prefilling: bool  # its prompt is not all in the cache yet
    speculates: bool  # its decoding proposes candidates (heads or draft)


@dataclass(frozen=True)
class Scheduled:
    """One sequence's part of the step."""

    index: int  # into the planned sequences
    write: int  # pending tokens the step writes (all of them unless `chunked`)
    chunked: bool  # a slice of its prompt: only written to the cache, no token is decided
    max_candidates: int  # candidates it may draft (0: none)


@dataclass(frozen=True)
class StepPlan:
    scheduled: tuple[Scheduled, ...]  # the sequences that run, in priority order
    out_of_room: tuple[int, ...]  # sequences whose pending tokens no longer fit: they finish
    prefill: bool  # some sequence writes prompt tokens this step

    def forward_groups(self, candidates: list[int]) -> list[list[int]]:
        """Positions in `scheduled` per forward, given the candidates each drafted (at most its
        `max_candidates`: a rule may collapse a tree, a draft chain may stop early)."""
        return plan_forwards([s.write + c for s, c in zip(self.scheduled, candidates)])


def plan_step(views: list[SeqView], prefill_chunk: int = 0, row_budget: int = 0) -> StepPlan:
    """The step for these sequences (in priority order); see the module docstring."""
    out_of_room = tuple(i for i, v in enumerate(views) if v.room < 0)
    live = [i for i, v in enumerate(views) if v.room >= 0]
    left = prefill_chunk
    writes = {}
    for i in live:
        n = views[i].pending
        if prefill_chunk > 0 and views[i].prefilling:
            n = min(n, left)
            left -= n
        if n > 0:
            writes[i] = n
    chunked = {i: writes[i] < views[i].pending for i in writes}
    room = {i: 0 if chunked[i] else views[i].room for i in writes}
    if row_budget > 0:
        spec = [i for i in writes if views[i].speculates and room[i] > 0]
        if spec:
            cap = max(1, (row_budget - sum(writes.values())) // len(spec))
            for i in spec:
                room[i] = min(room[i], cap)
    scheduled = tuple(Scheduled(i, writes[i], chunked[i], room[i] if views[i].speculates else 0)
                      for i in writes)
    return StepPlan(scheduled, out_of_room,
                    prefill=any(views[s.index].prefilling for s in scheduled))


def plan_forwards(lengths: list[int], overhead: float = FORWARD_OVERHEAD_ROWS,
                  padding_cost: float = PADDING_ROW_COST) -> list[list[int]]:
    """Split blocks of these lengths into groups, one padded forward each, minimising the padding
    (group size x its longest block, less its real rows, times `padding_cost`) plus `overhead` per
    forward. Groups are contiguous in length order (dynamic programming over the sorted lengths)."""
    order = sorted(range(len(lengths)), key=lambda b: lengths[b])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j blocks (sorted)
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        real = 0
        for i in range(j - 1, -1, -1):  # group = sorted blocks i .. j-1
            real += lengths[order[i]]
            padding = (j - i) * lengths[order[j - 1]] - real
            cost = best[i] + padding * padding_cost + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]
