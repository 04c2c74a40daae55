import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)  # tests share a 2-core machine

from models.voices.bundle import random_bundle  # noqa: E402


@pytest.fixture(scope="session")
def small_bundle():
    """Random target (2 layers, GQA 4:2), a 1-layer draft initialised from it, 4 draft heads."""
    return random_bundle(vocab_size=96, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=128, std=0.3, seed=0)


@pytest.fixture(scope="session")
def tiny_voice(tmp_path_factory):
    """A complete voice bundle with random weights (LM, draft heads, draft model, tiny vocoder,
    phonemes): everything a TextToSpeech needs, in seconds. Needs libespeak-ng."""
    frontend = pytest.importorskip("models.voices.frontend")
    try:
        frontend.Espeak("en-us")
    except OSError as exc:
        pytest.skip(f"espeak-ng unavailable: {exc}")
    from models.recipes.random_voice import build_random_voice

    return build_random_voice(tmp_path_factory.mktemp("voice"))
