"""Continuous batching: deadline order, chunked prefill, per-step row budget, forward grouping and
prefix reuse change when work happens, never what is generated."""

import itertools
import random

import pytest
import torch

from engine.decoding.engine import Engine
from engine.decoding.plan import plan_forwards
from engine.serving.deadlines import Playback, Policy
from engine.types import GenerationConfig


# --- the listener's clock ---------------------------------------------------------------------
def test_playback_counts_stalls_and_restarts_after_idle():
    p = Playback(created=0.0)
    assert not p.started and p.slack(0.0) == float("-inf")
    assert p.sent(0.5, now=1.0) == 0.0  # first audio at t=1: plays until 1.5
    assert p.slack(1.2) == pytest.approx(0.3)
    assert p.sent(0.5, now=1.4) == 0.0  # in time: plays until 2.0
    assert p.sent(1.0, now=2.25) == pytest.approx(0.25)  # the player waited 0.25 s
    assert p.play_end == pytest.approx(3.25)
    assert p.sent(0.1, now=3.3) == pytest.approx(0.05)
    assert p.max_underrun == pytest.approx(0.25) and p.total_underrun == pytest.approx(0.3)
    p.idle(now=10.0)  # the client sent no more text: its silence is not an underrun
    assert not p.started
    assert p.sent(0.5, now=12.0) == 0.0 and p.max_underrun == pytest.approx(0.25)


class S:
    def __init__(self, name, created, play_end=None):
        self.name, self.playback = name, Playback(created, play_end)


def names(streams):
    return [s.name for s in streams]


def test_startup_first_then_closest_to_running_dry():
    streams = [S("ahead", 0.0, 15.0), S("late", 2.0), S("dry", 0.0, 10.2), S("early", 1.0),
               S("mid", 0.0, 11.0)]
    assert names(Policy().order(streams)) == ["early", "late", "dry", "mid", "ahead"]


def test_streams_far_ahead_sit_out_while_one_is_urgent():
    policy = Policy(urgent_s=0.5, ahead_s=2.0)
    relaxed = [S("a", 0.0, 11.0), S("b", 0.0, 15.0)]
    assert names(policy.select(relaxed, now=10.0)) == ["a", "b"]  # nobody urgent: all run
    busy = relaxed + [S("new", 9.9)]
    assert names(policy.select(busy, now=10.0)) == ["new", "a"]  # b has 5 s buffered


def test_admission_holds_the_queue_when_behind_or_at_capacity():
    policy = Policy(behind_s=0.1)
    fine = [S("a", 0.0, 10.5), S("starting", 9.0)]
    assert policy.hold(fine, now=10.0) is None
    assert "behind" in policy.hold(fine + [S("stalled", 0.0, 9.7)], now=10.0)
    assert "ahead of real time" in policy.hold(fine, now=10.0, capacity=2)
    assert policy.hold(fine, now=10.0, capacity=3) is None
    relaxed = Policy(adaptive=False)
    assert relaxed.hold(fine + [S("stalled", 0.0, 9.7)], now=10.0, capacity=1) is None


def test_capacity_is_learned_from_step_costs():
    from engine.serving.capacity import Capacity

    cap = Capacity(margin=1.0)
    assert cap.streams() is None  # nothing measured yet: no limit
    for n in (1, 2, 4, 8) * 4:  # a step costs 10 ms + 5 ms per stream, gives each 40 ms of audio
        cap.record(n, 0.010 + 0.005 * n, 0.040 * n)
    assert cap.streams() == 6  # 40 / (10 + 5 n) >= 1  <=>  n <= 6
    same = Capacity(margin=1.0)
    for _ in range(10):  # one batch size only: cost taken as proportional (safe side)
        same.record(4, 0.030, 0.160)
    assert same.streams() == 5  # 40 ms of audio per 7.5 ms-per-stream step

# --- forward grouping ---------------------------------------------------------------------------
def cost(groups, lengths, overhead, padding_cost):
    return sum(padding_cost * (len(g) * max(lengths[b] for b in g) - sum(lengths[b] for b in g))
               + overhead for g in groups)


def test_a_prompt_chunk_is_not_padded_onto_running_sequences():
    lengths = [1] * 15 + [64]
    groups = plan_forwards(lengths, overhead=12, padding_cost=0.25)
    assert sorted(map(len, groups)) == [1, 15]
    # alike, or padding cheap against a forward: one forward
    assert plan_forwards([17, 17, 16, 17], overhead=12, padding_cost=1.0) == [[2, 0, 1, 3]]
    assert plan_forwards([1, 1, 2, 3], overhead=12, padding_cost=0.25) == [[0, 1, 2, 3]]


@pytest.mark.parametrize("padding_cost", [1.0, 0.25])
def test_forward_plan_is_optimal_and_covers_every_block(padding_cost):
    rng = random.Random(0)
    for _ in range(40):
        lengths = [rng.choice([1, 2, 3, 5, 17, 40, 64]) for _ in range(rng.randint(1, 6))]
        groups = plan_forwards(lengths, overhead=12, padding_cost=padding_cost)
        assert sorted(b for g in groups for b in g) == list(range(len(lengths)))
        best = min(cost([[b for b, k in enumerate(labels) if k == g] for g in set(labels)],
                        lengths, 12, padding_cost)
                   for labels in itertools.product(range(len(lengths)), repeat=len(lengths)))
        assert cost(groups, lengths, 12, padding_cost) == pytest.approx(best)


# --- the engine under the scheduler's knobs -------------------------------------------------------
@pytest.fixture(scope="module")
def engine(small_bundle):
    return Engine(small_bundle, max_batch=6, max_len=160)


def run(engine, prompts, cfgs, **knobs):
    """Like generate_batch, with the service's step options; sequences join one step apart."""
    seqs, out, waiting = [], {}, list(zip(range(len(prompts)), prompts, cfgs))
    while waiting or seqs:
        if waiting:
            i, p, c = waiting.pop(0)
            seqs.append((i, engine.add(p, c)))
        running = [s for _, s in seqs]
        engine.step(running, engine.plan(running, **knobs))
        for i, s in [x for x in seqs if x[1].finished]:
            out[i] = s.result()
            engine.release(s)
        seqs = [x for x in seqs if not x[1].finished]
    return [out[i] for i in range(len(prompts))]


@pytest.mark.parametrize("knobs", [dict(prefill_chunk=5), dict(row_budget=6),
                                   dict(prefill_chunk=3, row_budget=1)])
def test_chunked_prefill_and_row_budget_keep_exact_output(engine, knobs):
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 96, (n,), generator=gen).tolist() for n in (30, 2, 17, 41, 9)]
    cfgs = [GenerationConfig(max_new_tokens=24, decoding=d)
            for d in ("heads", "plain", "draft", "heads", "draft")]
    plain = [engine.generate(p, GenerationConfig(max_new_tokens=24)) for p in prompts]
    scheduled = run(engine, prompts, cfgs, **knobs)
    for a, b in zip(plain, scheduled):
        assert a.tokens == b.tokens
    if "prefill_chunk" in knobs:  # a 41-token prompt took several forwards before its first token
        assert scheduled[3].stats.target_forwards > plain[3].stats.target_forwards
    assert engine.cache.slots_in_use == 0


def test_newcomers_arriving_together_share_one_prefill_budget(engine):
    """Three prompts arriving in the same step write at most prefill_chunk prompt tokens per step
    in all (the first in line first), while a running sequence keeps decoding every step."""
    gen = torch.Generator().manual_seed(3)
    runner = engine.add(torch.randint(0, 96, (4,), generator=gen).tolist(),
                        GenerationConfig(max_new_tokens=40))
    engine.step([runner], engine.plan([runner], prefill_chunk=8))  # running now: its prompt is in the cache
    prompts = [torch.randint(0, 96, (n,), generator=gen).tolist() for n in (10, 6, 5)]
    cfg = GenerationConfig(max_new_tokens=5)
    newcomers = [engine.add(p, cfg) for p in prompts]
    cached = lambda: [engine.cache.lengths[s.slot] for s in newcomers]  # noqa: E731
    seen = []
    for _ in range(3):
        before, tokens = cached(), len(runner.tokens)
        engine.step([runner, *newcomers], engine.plan([runner, *newcomers], prefill_chunk=8))
        seen.append(cached())
        assert sum(seen[-1]) - sum(before) <= 8 + len(newcomers)  # + each one's first decision
        assert len(runner.tokens) > tokens  # never stalled
    assert seen[0] == [8, 0, 0] and seen[1][:2] == [10, 6]  # in line: 8, then 2 + 6
    while not all(s.finished for s in newcomers):
        live = [s for s in (runner, *newcomers) if not s.finished]
        engine.step(live, engine.plan(live, prefill_chunk=8))
    results = [s.result().tokens for s in newcomers]
    for s in (runner, *newcomers):
        engine.release(s)
    assert engine.cache.slots_in_use == 0
    assert results == [engine.generate(p, cfg).tokens for p in prompts]  # waiting changed nothing


def test_a_reused_prefix_gives_the_same_tokens_and_cache(small_bundle):
    engine = Engine(small_bundle, max_batch=2, max_len=160, prefix_blocks=6, prefix_block=4)
    fresh = Engine(small_bundle, max_batch=2, max_len=160)
    gen = torch.Generator().manual_seed(2)
    shared = torch.randint(0, 96, (13,), generator=gen).tolist()
    prompts = [shared + torch.randint(0, 96, (n,), generator=gen).tolist() for n in (5, 0, 9)]
    cfg = GenerationConfig(max_new_tokens=20, decoding="heads")
    first = engine.generate(prompts[0], cfg)
    assert first.stats.cached_prompt_tokens == 0
    # 18 tokens, seen: 4 whole blocks (one token is always computed); 13 and 22 tokens: the 3
    # blocks of the shared opening
    for prompt, hit in zip(prompts, (16, 12, 12)):
        got, want = engine.generate(prompt, cfg), fresh.generate(prompt, cfg)
        assert got.tokens == want.tokens
        assert got.stats.cached_prompt_tokens == hit
    again = engine.generate(prompts[2], cfg)  # 22 tokens: 5 blocks of 4 stored, one left to compute
    assert again.stats.cached_prompt_tokens == 20
    # the copied entries equal the computed ones
    seq = engine.add(prompts[2], cfg)
    ref = fresh.add(prompts[2], cfg)
    fresh.step([ref])
    n = seq.stats.cached_prompt_tokens
    assert torch.allclose(engine.cache.k[:, seq.slot, :, :n], fresh.cache.k[:, ref.slot, :, :n],
                          atol=1e-6)
    assert torch.allclose(engine.cache.v[:, seq.slot, :, :n], fresh.cache.v[:, ref.slot, :, :n],
                          atol=1e-6)
    engine.release(seq), fresh.release(ref)
    assert engine.prefix_cache.blocks_in_use <= 6  # bounded: older blocks were evicted


def test_prefix_pool_smaller_than_a_prompt_stays_correct(small_bundle):
    engine = Engine(small_bundle, max_batch=1, max_len=160, prefix_blocks=2, prefix_block=4)
    prompt = list(range(5, 40))
    cfg = GenerationConfig(max_new_tokens=10)
    runs = [engine.generate(prompt, cfg) for _ in range(3)]
    assert runs[0].tokens == runs[1].tokens == runs[2].tokens
    assert engine.prefix_cache.blocks_in_use == 2
