"""Speculative decoding in exact mode gives plain decoding's tokens, token for token."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.decoding.engine import Engine
from engine.decoding.sampling import SamplingParams
from engine.decoding.speculative import top_tau
from engine.decoding.tree import sparse_tree
from engine.types import GenerationConfig
from models.kv_cache import KVCache
from models.voices.bundle import random_bundle
from models.voices.rules import InterleavedRule

# A small interleaved vocabulary: 0 bos, 1 sep, 2 eop, 3 eos, 4..9 phonemes, 10..23 speech.
V, EOP, EOS = 24, 2, 3
PHONEMES, SPEECH = range(4, 10), range(10, 24)


def interleaved_rule(phonemes: list[int], max_frames: int = 4) -> InterleavedRule:
    allowed = torch.zeros(V, dtype=torch.bool)
    allowed[SPEECH.start:SPEECH.stop] = True
    allowed[EOP] = True
    return InterleavedRule(phonemes, allowed, EOP, EOS, max_frames=max_frames)


def make_engine(draft_copies_target: bool) -> Engine:
    bundle = random_bundle(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4,
                           num_kv_heads=2, intermediate_size=64, std=0.4, seed=1,
                           eos_token_id=EOS)
    if draft_copies_target:  # every draft token is right: exercises long accepted chains
        bundle.draft = copy.deepcopy(bundle.target)
    return Engine(bundle, max_batch=4, max_len=160)


ENGINES = {False: make_engine(False), True: make_engine(True)}

shapes = st.builds(
    lambda acc, n: sparse_tree(acc, n),
    st.lists(st.lists(st.floats(0.05, 1.0), min_size=4, max_size=4), min_size=4, max_size=4),
    st.integers(1, 40))
prompts = st.lists(st.integers(0, V - 1), min_size=1, max_size=24)
phoneme_lists = st.lists(st.sampled_from(list(PHONEMES)), min_size=1, max_size=6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=prompts, shape=shapes, phonemes=st.none() | phoneme_lists,
       temperature=st.sampled_from([0.0, 0.9]), seed=st.integers(0, 2**31))
def test_heads_exact_equals_plain(prompt, shape, phonemes, temperature, seed):
    engine = ENGINES[False]
    sampling = SamplingParams(temperature=temperature, top_k=8 if temperature else 0,
                              repetition_penalty=1.3, repetition_window=6)
    base = GenerationConfig(max_new_tokens=30, sampling=sampling, seed=seed)
    rule = interleaved_rule(phonemes) if phonemes else None
    plain = engine.generate(prompt, base, rule)
    heads = engine.generate(prompt, GenerationConfig(
        max_new_tokens=30, decoding="heads", tree=tuple(shape), sampling=sampling, seed=seed),
        rule and interleaved_rule(phonemes))
    assert heads.tokens == plain.tokens  # with a sample too: one draw per position, same order
    assert heads.finish_reason == plain.finish_reason


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=prompts, phonemes=st.none() | phoneme_lists, gamma=st.integers(1, 6),
       perfect_draft=st.booleans(), accept=st.sampled_from(["exact", "lossless"]))
def test_draft_exact_equals_plain(prompt, phonemes, gamma, perfect_draft, accept):
    engine = ENGINES[perfect_draft]
    sampling = SamplingParams(repetition_penalty=1.2, repetition_window=8)
    rule = interleaved_rule(phonemes) if phonemes else None
    plain = engine.generate(prompt, GenerationConfig(max_new_tokens=30, sampling=sampling), rule)
    draft = engine.generate(prompt, GenerationConfig(
        max_new_tokens=30, decoding="draft", accept=accept, gamma=gamma, sampling=sampling),
        rule and interleaved_rule(phonemes))
    assert draft.tokens == plain.tokens  # greedy: lossless is exact too
    if perfect_draft and len(plain.tokens) > 2:
        assert draft.stats.accepted > 0
        assert draft.stats.mean_accepted_length > 1.0


def test_heads_accept_something():
    """The exactness test above is not vacuous: trees do get accepted paths here."""
    engine = ENGINES[False]
    shape = sparse_tree([[0.5] * 8] * 4, 60)
    total = 0
    for seed in range(5):
        prompt = torch.randint(0, V, (8,), generator=torch.Generator().manual_seed(seed)).tolist()
        r = engine.generate(prompt, GenerationConfig(max_new_tokens=40, decoding="heads",
                                                     tree=tuple(shape)))
        total += r.stats.accepted
    assert total > 0


def test_rule_is_honoured_by_every_mode():
    engine = ENGINES[False]
    phonemes = [4, 7, 5, 9]
    for decoding, accept in [("plain", "exact"), ("heads", "tolerance"), ("draft", "tolerance"),
                             ("heads", "lossless"), ("draft", "lossless")]:
        cfg = GenerationConfig(max_new_tokens=100, decoding=decoding, accept=accept, tau=3,
                               beta=0.5, sampling=SamplingParams(temperature=1.0), seed=3)
        out = engine.generate([0, 4, 7, 5, 9, 1], cfg, interleaved_rule(phonemes)).tokens
        assert out[-1] == EOS and out.count(EOS) == 1
        assert [t for t in out if t in PHONEMES] == phonemes
        assert out[0] == phonemes[0]
        for prev, tok in zip(out, out[1:]):
            if prev == EOP:
                assert tok in PHONEMES or tok == EOS  # the forced token follows each marker
            elif tok in PHONEMES:
                assert prev == EOP
        frames = 0
        for tok in out:  # max_frames=4 forces the marker after 4 speech tokens
            frames = frames + 1 if tok in SPEECH else 0
            assert frames <= 4


@pytest.mark.parametrize("decoding", ["heads", "draft"])
def test_tau_one_greedy_tolerance_equals_plain(decoding):
    """Greedy tolerance never leaves the target's top-τ: with τ = 1 it is plain greedy, even with
    SSD's β (which only raises the acceptance of supported tokens)."""
    engine = ENGINES[False]
    prompt = [3, 14, 15, 9, 2, 6]
    plain = engine.generate(prompt, GenerationConfig(max_new_tokens=40))
    tol = engine.generate(prompt, GenerationConfig(max_new_tokens=40, decoding=decoding,
                                                   accept="tolerance", tau=1, beta=0.9, seed=1))
    assert tol.tokens == plain.tokens
    # τ = 8 but a ratio floor of 1: only the top token passes, so plain again
    floor = engine.generate(prompt, GenerationConfig(max_new_tokens=40, decoding=decoding,
                                                     accept="tolerance", tau=8, min_ratio=1.0,
                                                     beta=0.9, seed=1))
    assert floor.tokens == plain.tokens


def test_top_tau_ratio_floor():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert top_tau(logits, 3) == [0, 1, 2]
    assert top_tau(logits, 3, min_ratio=0.5) == [0, 1]  # 0.3 / 0.5 = 0.6 >= 0.5; 0.15 / 0.5 < 0.5
    assert top_tau(logits.masked_fill(torch.tensor([False, True, True, True]), float("-inf")),
                   3, 0.1) == [0]  # disallowed tokens never pass


def test_cache_after_rejections_equals_cache_of_accepted_tokens():
    engine = make_engine(False)
    shape = sparse_tree([[0.5] * 8] * 4, 60)
    seq = engine.add([5, 11, 20, 3, 8], GenerationConfig(max_new_tokens=60, decoding="heads",
                                                          tree=tuple(shape)))
    while not seq.finished:
        engine.step([seq])
    assert seq.stats.accepted > 0 and seq.stats.drafted > seq.stats.accepted
    length = engine.cache.lengths[seq.slot]
    assert length == len(seq.tokens) - 1  # everything but the last token is cached

    cfg = engine.target.config
    fresh = KVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, 160, cfg.head_dim)
    slot = fresh.allocate()
    layout = fresh.layout([slot], [list(range(-1, length - 1))])
    with torch.no_grad():
        engine.target(torch.tensor([seq.tokens[:length]]), fresh, layout)
    ours = engine.cache.k[:, seq.slot, :, :length], engine.cache.v[:, seq.slot, :, :length]
    ref = fresh.k[:, slot, :, :length], fresh.v[:, slot, :, :length]
    assert torch.allclose(ours[0], ref[0], atol=1e-5) and torch.allclose(ours[1], ref[1], atol=1e-5)
    engine.release(seq)
    assert engine.cache.slots_in_use == 0


def test_compiled_draft_heads_equal_the_torch_heads():
    """The compiled CPU heads runner gives the torch heads' logits for one or several sequences,
    all heads or the first few."""
    from models.heads import DraftHeads
    from models.runners import CompiledCpuHeads

    heads = DraftHeads(4, 32, 50)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in heads.parameters():  # the blocks start as the identity: make them count
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    hidden = torch.randn(3, 32, generator=gen)
    with torch.no_grad():
        expected = heads(hidden)  # (B, K, V)
        compiled = CompiledCpuHeads(heads)
        for rows in (hidden[:1], hidden):
            got = compiled(rows)
            assert got.shape == (len(rows), 4, 50)
            assert (got - expected[:len(rows)]).abs().max() <= 1e-5
        assert (compiled(hidden, 2) - expected[:, :2]).abs().max() <= 1e-5
    assert heads(hidden).requires_grad
