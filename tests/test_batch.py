"""A batch equals its members run alone; bad input is refused without harming other sequences."""

import pytest
import torch

from engine.decoding.engine import Engine
from engine.decoding.sampling import SamplingParams
from engine.types import GenerationConfig


@pytest.fixture(scope="module")
def engine(small_bundle):
    return Engine(small_bundle, max_batch=6, max_len=128)


def test_batch_equals_members_alone(engine):
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 96, (n,), generator=gen).tolist() for n in (3, 17, 1, 40, 9, 25)]
    cfgs = [GenerationConfig(max_new_tokens=n, decoding=d, accept=a, seed=i,
                             sampling=SamplingParams(temperature=t, top_p=0.9))
            for i, (n, d, a, t) in enumerate([(20, "plain", "exact", 0.0),
                                              (35, "heads", "exact", 0.0),
                                              (12, "draft", "exact", 0.0),
                                              (30, "heads", "tolerance", 0.8),
                                              (25, "draft", "lossless", 0.7),
                                              (28, "plain", "exact", 1.0)])]
    together = engine.generate_batch(prompts, cfgs)
    alone = [engine.generate(p, c) for p, c in zip(prompts, cfgs)]
    for t, a in zip(together, alone):
        assert t.tokens == a.tokens
        assert t.stats.target_forwards == a.stats.target_forwards
    assert engine.cache.slots_in_use == 0 and engine.draft_cache.slots_in_use == 0


@pytest.mark.parametrize("prompt, cfg, message", [
    ([], GenerationConfig(), "empty"),
    ([1, 2, 96], GenerationConfig(), "outside the vocabulary"),
    ([1, -1], GenerationConfig(), "outside the vocabulary"),
    (list(range(90)) * 2, GenerationConfig(), "cache"),
    ([1, 2], GenerationConfig(max_new_tokens=0), "max_new_tokens"),
    ([1, 2], GenerationConfig(decoding="heads", accept="tolerance", tau=0), "tau"),
    ([1, 2], GenerationConfig(decoding="medusa"), "unknown decoding"),
    ([1, 2], GenerationConfig(accept="typical"), "unknown accept"),
    ([1, 2], GenerationConfig(sampling=SamplingParams(temperature=-1)), "temperature"),
    ([1, 2], GenerationConfig(decoding="heads", tree=((0,), (1, 0))), "parent"),
])
def test_bad_input_raises_value_error(engine, prompt, cfg, message):
    with pytest.raises(ValueError, match=message):
        engine.generate(prompt, cfg)


def test_bad_request_does_not_disturb_others(engine):
    cfg = GenerationConfig(max_new_tokens=30, decoding="heads")
    reference = engine.generate([4, 8, 15, 16], cfg).tokens
    seq = engine.add([4, 8, 15, 16], cfg)
    for _ in range(3):
        engine.step([seq])
    with pytest.raises(ValueError):
        engine.add([4, 999], cfg)
    with pytest.raises(ValueError):
        engine.generate([1] * 500, cfg)
    while not seq.finished:
        engine.step([seq])
    engine.release(seq)
    assert seq.generated == reference
    assert engine.cache.slots_in_use == 0


def test_generation_stops_at_eos_like_transformers(small_bundle):
    engine = Engine(small_bundle, max_batch=1, max_len=128)
    free = engine.generate([1, 2, 3], GenerationConfig(max_new_tokens=40)).tokens
    eos = free[5]
    engine.eos = frozenset({eos})
    stopped = engine.generate([1, 2, 3], GenerationConfig(max_new_tokens=40))
    assert stopped.tokens == free[:free.index(eos) + 1] and stopped.finish_reason == "eos"
