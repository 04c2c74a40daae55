"""The step plan alone (no torch, no model): who writes what, how many candidates each may draft, and
the forward groups, from plain views of the sequences."""

import sys

from engine.decoding.plan import SeqView, plan_forwards, plan_step


def running(room=100, speculates=True) -> SeqView:
    """A decoding sequence: one pending token (its last one)."""
    return SeqView(pending=1, room=room, prefilling=False, speculates=speculates)


def newcomer(prompt: int, room=100, speculates=True) -> SeqView:
    return SeqView(pending=prompt, room=room, prefilling=True, speculates=speculates)


def test_no_budgets_writes_every_pending_token_and_allows_the_whole_room():
    plan = plan_step([running(room=40), newcomer(12), running(speculates=False)])
    assert [(s.index, s.write, s.chunked) for s in plan.scheduled] == [(0, 1, False), (1, 12, False),
                                                                       (2, 1, False)]
    assert [s.max_candidates for s in plan.scheduled] == [40, 100, 0]  # plain drafts nothing
    assert plan.prefill and plan.out_of_room == ()


def test_prefill_budget_is_shared_in_priority_order():
    """10 prompt tokens a step: the first newcomer writes 10 of its 25 (chunked: no token decided,
    no candidates), the second sits out; running sequences decode regardless."""
    plan = plan_step([running(), newcomer(25), newcomer(6), running()], prefill_chunk=10)
    got = {s.index: (s.write, s.chunked, s.max_candidates) for s in plan.scheduled}
    assert got == {0: (1, False, 100), 1: (10, True, 0), 3: (1, False, 100)}
    assert [s.index for s in plan.scheduled] == [0, 1, 3]  # priority order kept
    # the rest of the first prompt (15) exceeds the budget again; the second waits its turn
    plan = plan_step([newcomer(15), newcomer(6)], prefill_chunk=10)
    assert [(s.index, s.write, s.chunked) for s in plan.scheduled] == [(0, 10, True)]
    plan = plan_step([newcomer(4), newcomer(6)], prefill_chunk=10)
    assert [(s.index, s.write, s.chunked) for s in plan.scheduled] == [(0, 4, False), (1, 6, False)]


def test_row_budget_splits_the_rows_left_among_speculators():
    views = [running(), running(), running(speculates=False), newcomer(5)]
    plan = plan_step(views, row_budget=20)
    # 20 rows - 8 pending = 12 for 3 speculators: 4 candidates each; plain still none
    assert [s.max_candidates for s in plan.scheduled] == [4, 4, 0, 4]
    tight = plan_step(views, row_budget=3)  # never below one candidate
    assert [s.max_candidates for s in tight.scheduled] == [1, 1, 0, 1]
    small_room = plan_step([running(room=2), running()], row_budget=40)
    assert [s.max_candidates for s in small_room.scheduled] == [2, 19]


def test_a_sequence_out_of_room_finishes_and_does_not_run():
    plan = plan_step([running(room=-1), running(room=0)])
    assert plan.out_of_room == (0,)
    assert [(s.index, s.max_candidates) for s in plan.scheduled] == [(1, 0)]
    assert not plan.prefill


def test_forward_groups_follow_the_drafted_candidates():
    plan = plan_step([running(), running(), newcomer(30)])
    groups = plan.forward_groups([3, 3, 0])
    assert groups == plan_forwards([4, 4, 30])
    assert sorted(i for g in groups for i in g) == [0, 1, 2]
    assert [0, 1] in groups and [2] in groups  # the prompt is not padded onto the one-token blocks


def test_the_planner_needs_no_torch():
    """Imported alone (a fresh interpreter: this one has torch already), the planner loads no torch."""
    import os
    import subprocess
    from pathlib import Path

    code = ("import sys; import engine.decoding.plan; "
            "assert 'torch' not in sys.modules, 'plan imported torch'")
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root,
                   env={**os.environ, "PYTHONPATH": str(root)})
