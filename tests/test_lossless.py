"""Lossless speculative sampling keeps the target's sampling distribution (a chi-square test)."""

import math

import pytest
import torch

from engine.decoding.engine import Engine
from engine.decoding.sampling import SamplingParams, distribution
from engine.types import GenerationConfig
from models.kv_cache import KVCache
from models.voices.bundle import random_bundle

V, PROMPT, RUNS, BATCH = 6, [1, 4, 2], 3000, 100


@pytest.fixture(scope="module")
def engine():
    bundle = random_bundle(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4,
                           num_kv_heads=2, intermediate_size=64, std=0.5, seed=7)
    return Engine(bundle, max_batch=BATCH, max_len=16)


def exact_joint(model, params: SamplingParams) -> torch.Tensor:
    """P(x1, x2 | prompt) of sampling from `model`, (V, V)."""
    cfg = model.config
    joint = torch.zeros(V, V)
    for x1 in range(V):
        ids = PROMPT + [x1]
        cache = KVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, 16, cfg.head_dim)
        layout = cache.layout([cache.allocate()], [list(range(-1, len(ids) - 1))])
        with torch.no_grad():
            logits = model.logits(model(torch.tensor([ids]), cache, layout))[0]
        p1 = distribution(logits[-2], params)
        joint[x1] = p1[x1] * distribution(logits[-1], params)
    return joint


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test; cells expecting < 5 are pooled. Wilson-Hilferty approximation of the tail."""
    expected = probs.flatten() * counts.sum()
    counts = counts.flatten().float()
    small = expected < 5
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    obs = torch.cat([counts[~small], counts[small].sum().view(1)])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = int(keep.sum()) - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def sample_pairs(engine, decoding: str) -> tuple[torch.Tensor, int]:
    counts, accepted = torch.zeros(V, V), 0
    params = SamplingParams(temperature=1.0)
    for start in range(0, RUNS, BATCH):
        cfgs = [GenerationConfig(max_new_tokens=2, decoding=decoding, accept="lossless", gamma=2,
                                 sampling=params, seed=start + i, stop_on_eos=False)
                for i in range(BATCH)]
        for r in engine.generate_batch([PROMPT] * BATCH, cfgs):
            counts[r.tokens[0], r.tokens[1]] += 1
            accepted += r.stats.accepted
    return counts, accepted


@pytest.mark.parametrize("decoding", ["draft", "heads", "plain"])
def test_lossless_matches_target_distribution(engine, decoding):
    params = SamplingParams(temperature=1.0)
    target = exact_joint(engine.target, params)
    counts, accepted = sample_pairs(engine, decoding)
    assert chi_square_p_value(counts, target) > 1e-3
    assert (accepted > RUNS // 10) == (decoding != "plain")  # drafts were really accepted
    if decoding == "draft":
        # the test has power: the draft model's own distribution is rejected
        assert chi_square_p_value(counts, exact_joint(engine.draft, params)) < 1e-3
