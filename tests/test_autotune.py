"""Decoding "auto" (engine.decoding.autotune): every decoding the bundle has is measured on this machine, the
fastest is kept, and with exact acceptance the choice never changes the audio."""

import pytest

from engine.decoding.autotune import (SPECULATION_MARGIN, Measured, auto_config, candidates, fastest,
                                     measure)
from engine.tts import TextToSpeech
from engine.types import GenerationConfig

TEXT = "A short sentence to measure."


@pytest.fixture(scope="module")
def tts(tiny_voice):
    return TextToSpeech(tiny_voice, max_batch=2)


def test_every_decoding_and_smaller_trees_are_measured(tts):
    cfg = GenerationConfig(max_new_tokens=10**6)
    measured = measure(tts, TEXT, cfg, rounds=1)
    assert [m.label for m in measured] == ["plain", "heads 2 nodes", "heads 4 nodes",
                                           "heads 8 nodes", "heads 64 nodes", "draft"]
    assert all(m.tokens_per_s > 0 for m in measured)
    trees = [m.cfg.tree for m in measured if m.cfg.decoding == "heads"]
    assert [len(t) for t in trees] == [2, 4, 8, 64]
    assert trees[-1] == tuple(tts.engine.default_trees["exact"])  # the bundle's own tree
    assert [label for label, _ in candidates(tts, cfg)] == [m.label for m in measured]


def test_speculation_must_beat_plain_by_the_margin():
    def at(rates: dict[str, float]) -> list[Measured]:
        return [Measured(k, GenerationConfig(decoding=k.split()[0]), v) for k, v in rates.items()]
    assert fastest(at({"plain": 100, "heads 2 nodes": 105}), margin=1.1).label == "plain"
    assert fastest(at({"plain": 100, "heads 2 nodes": 120, "draft": 115}), margin=1.1
                   ).label == "heads 2 nodes"
    assert fastest(at({"plain": 100, "draft": 105}), margin=1.0).label == "draft"


def test_auto_keeps_plain_audio_in_exact_mode(tts):
    base = GenerationConfig(max_new_tokens=10**6, accept="exact")
    cfg, measured = auto_config(tts, TEXT, base, rounds=1)
    # the winner by the margin, measured here
    assert cfg.decoding == fastest(measured, SPECULATION_MARGIN).cfg.decoding
    heads = [m for m in measured if m.cfg.decoding == "heads"]
    assert cfg.tree == fastest(heads).cfg.tree  # a request asking for heads gets the fastest tree
    text = "The auto choice speaks the same words. Twice over."
    plain = tts.synthesize(text, base).tokens
    for c in [cfg, *(m.cfg for m in measured)]:  # whichever wins on this machine
        assert tts.synthesize(text, c).tokens == plain
