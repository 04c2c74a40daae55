import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)  # tests share a 2-core machine

from models.bundle import random_bundle  # noqa: E402


@pytest.fixture(scope="session")
def small_bundle():
    """Random target (2 layers, GQA 4:2), a 1-layer draft initialised from it, 4 draft heads."""
    return random_bundle(vocab_size=96, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=128, std=0.3, seed=0)


@pytest.fixture(scope="session")
def tiny_voice(tmp_path_factory):
    """A complete voice bundle with random weights (LM, draft heads, draft model, tiny vocoder,
    phonemes): everything a TextToSpeech needs, in seconds. Needs libespeak-ng."""
    frontend = pytest.importorskip("models.frontend")
    try:
        frontend.Espeak("en-us")
    except OSError as exc:
        pytest.skip(f"espeak-ng unavailable: {exc}")
    from models import interleaved
    from models.bundle import save_bundle
    from models.vocoder import CausalVocos, VocoderConfig

    num_speech = 16
    bundle = random_bundle(vocab_size=interleaved.vocab_size(num_speech), hidden_size=32,
                           num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                           std=0.3, seed=5)
    bundle.tokens = interleaved.token_layout(num_speech)
    path = tmp_path_factory.mktemp("voice")
    save_bundle(bundle, path, extra={"name": "tiny", "max_frames_per_phoneme": 4,
                                     "frontend": {"voice": "en-us", "phonemes": "phonemes.json"},
                                     "vocoder": "vocoder"})
    frontend.PhonemeVocab().save(path / "phonemes.json")
    CausalVocos(VocoderConfig(num_tokens=num_speech, dim=32, intermediate=64,
                              num_blocks=2)).save(path / "vocoder")
    return path
