"""The naturalness judge hears what a listener would: clean speech over the same speech in noise."""

import numpy as np
import pytest

pytest.importorskip("speechmos")

from bench.dnsmos import FIELDS, NaturalnessJudge  # noqa: E402
from models.voices.frontend import Espeak, EspeakUnavailable  # noqa: E402


def test_clean_speech_scores_above_the_same_speech_in_noise():
    try:
        espeak = Espeak("en-us")
    except EspeakUnavailable as e:
        pytest.skip(f"espeak-ng not available: {e}")
    utt = espeak.synthesize("The quick brown fox jumps over the lazy dog near the bank of the river.")
    judge = NaturalnessJudge()
    clean = judge.score(utt.audio, espeak.sample_rate)
    noisy = judge.score(utt.audio + np.random.default_rng(0).normal(0, 0.05, len(utt.audio)),
                        espeak.sample_rate)
    assert set(clean) == set(FIELDS)
    assert all(1.0 <= v <= 5.0 for v in clean.values())
    assert clean["bak_mos"] > noisy["bak_mos"] + 1.0 and clean["ovrl_mos"] > noisy["ovrl_mos"] + 0.5
    with pytest.raises(ValueError):
        judge.score(np.zeros(0), 16000)
