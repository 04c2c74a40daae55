import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)  # tests share a 2-core machine

from models.voices.bundle import random_bundle  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip on a machine without a CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (bench/gpu_check.sh)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def small_bundle():
    """Random target (2 layers, GQA 4:2), a 1-layer draft initialised from it, 4 draft heads."""
    return random_bundle(vocab_size=96, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=128, std=0.3, seed=0)


@pytest.fixture(scope="session")
def orpheus_dirs(tmp_path_factory):
    """(checkpoint, codec, draft) directories of a random Orpheus-layout model as a download lays
    them out (`models.voices.random_orpheus`); the draft is the target's first layer."""
    pytest.importorskip("snac")
    pytest.importorskip("tokenizers")
    from models.voices.bundle import draft_from_target
    from models.voices.random_orpheus import (build_random_codec, random_orpheus_model,
                                              save_checkpoint)

    root = tmp_path_factory.mktemp("orpheus")
    target = random_orpheus_model(seed=0)
    ckpt = save_checkpoint(target, root / "orpheus-tiny-ft")
    codec = build_random_codec(root / "snac_24khz")
    draft = save_checkpoint(draft_from_target(target, 1), root / "draft", shards=1,
                            tokenizer=False)
    return ckpt, codec, draft


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
