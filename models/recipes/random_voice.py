"""A complete voice bundle with random weights, in seconds: for tests and for trying the pipeline
before (or without) the trained voice. Needs its frontend (libespeak-ng, or Festival with
`frontend="festival"`) at use time, not to build."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.vocoder import CausalVocos, VocoderConfig
from models.voices import interleaved
from models.voices.bundle import random_bundle, save_bundle
from models.voices.festival import FESTIVAL_PHONES
from models.voices.frontend import EN_US_PHONEMES, PhonemeVocab


def build_random_voice(path: str | Path, num_speech: int = 16, seed: int = 5,
                       phoneme_coverage: float = 0.6, frontend: str = "espeak") -> Path:
    """Random weights, and random per-phoneme token counts (about half the tokens never seen for each
    phoneme) so that the phoneme-aware output constraint binds."""
    path = Path(path)
    bundle = random_bundle(vocab_size=interleaved.vocab_size(num_speech), hidden_size=32,
                           num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                           std=0.3, seed=seed)
    bundle.tokens = interleaved.token_layout(num_speech)
    rng = np.random.default_rng(seed)
    shape = (interleaved.PHONEME_SLOTS, num_speech)
    counts = rng.integers(1, 100, shape) * (rng.random(shape) < 0.5)
    path.mkdir(parents=True, exist_ok=True)
    front = ({"kind": "festival", "phonemes": "phonemes.json"} if frontend == "festival"
             else {"voice": "en-us", "phonemes": "phonemes.json"})
    save_bundle(bundle, path, extra={"name": "tiny", "max_frames_per_phoneme": 4, "frontend": front,
                                     "vocoder": "vocoder",
                                     "phoneme_tokens": interleaved.save_phoneme_counts(
                                         path, counts, phoneme_coverage)})
    PhonemeVocab(FESTIVAL_PHONES if frontend == "festival" else EN_US_PHONEMES).save(
        path / "phonemes.json")
    CausalVocos(VocoderConfig(num_tokens=num_speech, dim=32, intermediate=64,
                              num_blocks=2)).save(path / "vocoder")
    return path
