"""Which family a checkpoint is: detected from its vocabulary and tokenizer, or named by its
`spectts-family.json` (which may also list the speakers of a fine-tune); a bad profile is refused
with one line naming what is wrong."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("snac")
pytest.importorskip("tokenizers")

from engine.orpheus_tts import OrpheusTTS, load_tts, preflight  # noqa: E402
from models.voices.families import PROFILE_FILE, family_of  # noqa: E402


@pytest.fixture
def ckpt_copy(orpheus_dirs, tmp_path):
    return shutil.copytree(orpheus_dirs[0], tmp_path / "ckpt")


def test_detection_without_a_profile(orpheus_dirs, ckpt_copy):
    assert family_of(orpheus_dirs[0]) == "orpheus"
    config = json.loads((ckpt_copy / "config.json").read_text())
    (ckpt_copy / "config.json").write_text(json.dumps({**config, "vocab_size": 128256}))
    assert family_of(ckpt_copy) == "bundle"  # a plain Llama: token ids only


def test_a_profile_names_the_speakers_of_a_fine_tune(orpheus_dirs, ckpt_copy):
    (ckpt_copy / PROFILE_FILE).write_text(json.dumps({"family": "orpheus",
                                                      "voices": ["alice", "bob"]}))
    assert family_of(ckpt_copy) == "orpheus"
    tts = OrpheusTTS(ckpt_copy, orpheus_dirs[1], max_batch=1, max_len=64)
    assert tts.voices == ("alice", "bob") and tts.default_voice == "alice"
    (plan,) = tts.plan("Hi there.", voice="bob")
    assert tts.tokenizer.decode(plan.prompt[2:-4]) == "bob: Hi there."
    with pytest.raises(ValueError, match="alice, bob"):
        tts.plan("Hi.", voice="tara")
    with pytest.raises(ValueError, match="--codec"):
        load_tts(ckpt_copy)  # still an Orpheus checkpoint: it needs its codec


@pytest.mark.parametrize("profile, message", [
    ({"family": "llasa"}, "must be one of bundle, orpheus"),
    ({"family": "orpheus", "speakers": ["x"]}, "unknown keys"),
    ({"family": "orpheus", "voices": []}, "non-empty list"),
    ({"family": "bundle"}, "not 'orpheus'"),
])
def test_a_bad_profile_is_refused_with_one_line(orpheus_dirs, ckpt_copy, profile, message):
    (ckpt_copy / PROFILE_FILE).write_text(json.dumps(profile))
    with pytest.raises(ValueError, match=message):
        preflight(ckpt_copy, orpheus_dirs[1])
        OrpheusTTS(ckpt_copy, orpheus_dirs[1], max_batch=1, max_len=64)
