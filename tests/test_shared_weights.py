"""Draft heads that use the target's output layer, and a draft model that takes the target's
embeddings and output layer: the bundle stores none of those tensors twice, loads them from the
target, and speculative decoding with them still equals plain greedy token for token."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from engine.decoding.engine import Engine
from engine.decoding.sampling import SamplingParams
from engine.types import GenerationConfig
from models.heads import DraftHeads
from models.runners import CompiledCpuHeads
from models.voices.bundle import DRAFT_SHARES, load_bundle, random_bundle, save_bundle

V, EOS = 40, 3
GREEDY = SamplingParams(temperature=0.0)


def shared_bundle():
    return random_bundle(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=64, std=0.4, seed=3, eos_token_id=EOS, shared_out=True,
                         draft_shares=True)


def test_shared_heads_hold_only_their_blocks_and_use_the_targets_layer():
    bundle = shared_bundle()
    heads, target = bundle.heads, bundle.target
    assert heads.shared_out and all(k.startswith("heads.") and ".block." in k
                                    for k in heads.state_dict())
    assert sum(p.numel() for p in heads.parameters()) == 4 * (32 * 32 + 32)
    hidden = torch.randn(5, 32)
    with torch.no_grad():
        for k, head in enumerate(heads.heads):
            expected = F.linear(head.block(hidden), target.lm_head.weight)  # (5, V)
            assert torch.allclose(heads(hidden)[:, k], expected, atol=1e-6)
        assert (CompiledCpuHeads(heads)(hidden) - heads(hidden)).abs().max() <= 1e-5
    own = DraftHeads(4, 32, V)
    assert sum(p.numel() for p in own.parameters()) == 4 * (32 * 32 + 32 + V * 32)


def test_a_bundle_stores_shared_tensors_once_and_loads_them_from_the_target(tmp_path):
    bundle = shared_bundle()
    save_bundle(bundle, tmp_path)
    assert set(load_file(str(tmp_path / "draft" / "model.safetensors"))).isdisjoint(DRAFT_SHARES)
    assert not any(".out." in k for k in load_file(str(tmp_path / "heads.safetensors")))
    loaded = load_bundle(tmp_path)
    assert loaded.draft_shares == DRAFT_SHARES and loaded.heads.shared_out
    ids = torch.tensor([[5, 9, 1, 22, 7]])
    with torch.no_grad():
        for old, new in ((bundle.target, loaded.target), (bundle.draft, loaded.draft)):
            assert torch.allclose(old.logits(old(ids)), new.logits(new(ids)), atol=1e-5)
        hidden = loaded.target(ids)[0]  # (T, D)
        assert torch.allclose(bundle.heads(hidden), loaded.heads(hidden), atol=1e-5)


def test_exact_speculation_with_shared_weights_equals_plain_greedy(tmp_path):
    save_bundle(shared_bundle(), tmp_path)
    engine = Engine(load_bundle(tmp_path), max_batch=2, max_len=120)
    for prompt in ([5, 9, 1], [7, 7, 30, 12, 4, 8]):
        plain = engine.generate(prompt, GenerationConfig(max_new_tokens=40, sampling=GREEDY))
        for decoding in ("heads", "draft"):
            spec = engine.generate(prompt, GenerationConfig(max_new_tokens=40, sampling=GREEDY,
                                                            decoding=decoding))
            assert spec.tokens == plain.tokens, decoding


def test_phoneme_token_shares_in_float16_allow_the_same_tokens_as_the_counts(tmp_path):
    """The per-phoneme token table is stored as float16 shares (half of int32's bytes): the
    phoneme-aware masks it gives equal those of the exact counts."""
    import numpy as np

    from models.voices import interleaved

    rng = np.random.default_rng(0)
    counts = rng.zipf(1.6, (interleaved.PHONEME_SLOTS, 300)).astype(np.int64) - 1  # heavy tails
    counts[7] = 0  # a phoneme never spoken
    entry = interleaved.save_phoneme_counts(tmp_path, counts, 0.99)
    loaded = interleaved.load_phoneme_counts(tmp_path, entry)
    layout = interleaved.token_layout(300)
    vocab = layout.speech[1]
    for coverage in (0.9, 0.99):
        exact = interleaved.phoneme_allowed_masks(layout, counts, coverage, vocab)
        stored = interleaved.phoneme_allowed_masks(layout, loaded, coverage, vocab)
        assert all(bool((a == b).all()) for a, b in zip(exact, stored))
