"""Text to speech end to end on a random-weight voice: every mode, bad input, the synth CLI."""

import json

import numpy as np
import pytest
import soundfile

from engine.tts import TextToSpeech
from engine.types import GenerationConfig
from models.voices.frontend import PristineEspeak, normalize
from server.cli import main

BIG = 10**6


@pytest.fixture(scope="module")
def tts(tiny_voice):
    return TextToSpeech(tiny_voice, max_batch=4)


def test_synthesize_gives_audio_for_every_sentence(tts):
    speech = tts.synthesize("Hello world. How are you today?")
    assert speech.sample_rate == 22050
    assert len(speech.audio) == len(speech.tokens) * 441 > 0
    assert np.isfinite(speech.audio).all() and np.abs(speech.audio).max() <= 1.0
    # every phoneme gets at most max_frames (4) frames: generation always ends
    n_phonemes = sum(len(p.phonemes) for p in tts.plan("Hello world. How are you today?"))
    assert len(speech.tokens) <= 4 * n_phonemes


def test_every_mode_runs_and_exact_modes_equal_plain(tts):
    text = "The train leaves at 6:15 tomorrow."
    plain = tts.synthesize(text, GenerationConfig(max_new_tokens=BIG)).tokens
    for decoding, accept in [("heads", "exact"), ("draft", "exact"), ("heads", "tolerance"),
                             ("draft", "tolerance"), ("heads", "lossless"), ("draft", "lossless")]:
        out = tts.synthesize(text, GenerationConfig(max_new_tokens=BIG, decoding=decoding,
                                                    accept=accept, seed=1))
        assert len(out.audio) == len(out.tokens) * 441 > 0
        if accept != "tolerance":  # greedy lossless is exact
            assert out.tokens == plain


@pytest.mark.parametrize("text", ["", "   \n\t", "😀😀", "!!!", "\x00\x07"])
def test_unspeakable_text_is_refused(tts, text):
    with pytest.raises(ValueError):
        tts.plan(text)


def test_unspeakable_characters_inside_good_text_are_skipped(tts):
    assert [p.phonemes for p in tts.plan("Hello 😀 world")] == \
        [p.phonemes for p in tts.plan("Hello world")]


def test_long_text_is_split_not_truncated(tts):
    text = " ".join(["This sentence is one of many."] * 30)
    plans = tts.plan(text)
    assert len(plans) == 30


def test_cli_synth_writes_wav(tiny_voice, tmp_path, capsys):
    out = tmp_path / "hello.wav"
    assert main(["synth", "Hello there.", "-o", str(out), "--bundle", str(tiny_voice)]) == 0
    audio, rate = soundfile.read(out)
    assert rate == 22050 and len(audio) > 0


def test_cli_synth_text_file_json(tiny_voice, tmp_path, capsys):
    lines = tmp_path / "in.txt"
    lines.write_text("One line.\nAnother line here.\n")
    code = main(["synth", "--text-file", str(lines), "--out-dir", str(tmp_path / "o"), "--json",
                 "--bundle", str(tiny_voice), "--decoding", "heads", "--seed", "3"])
    assert code == 0
    rows = [json.loads(r) for r in capsys.readouterr().out.strip().splitlines()]
    assert [r["text"] for r in rows] == ["One line.", "Another line here."]
    for i, r in enumerate(rows):
        assert (tmp_path / "o" / f"{i:03d}.wav").exists()
        assert r["audio_seconds"] == pytest.approx(len(r["tokens"]) * 441 / 22050)
        assert r["stats"]["target_forwards"] > 0 and r["stats"]["gen_seconds"] > 0


@pytest.mark.parametrize("text", ["", "   ", "😀"])
def test_cli_synth_bad_text_exits_2(tiny_voice, tmp_path, capsys, text):
    code = main(["synth", text, "-o", str(tmp_path / "x.wav"), "--bundle", str(tiny_voice)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err


def test_each_phoneme_speaks_only_its_own_tokens(tts):
    """The phoneme-aware constraint: every frame generated after phoneme p is one of the speech tokens
    that cover the bundle's share of p's training frames, in every decoding mode."""
    assert tts.phoneme_masks is not None
    plan = tts.plan("Seven quick foxes.")[0]
    lo = tts.layout.phonemes[0]
    for decoding, accept in [("plain", "exact"), ("heads", "tolerance"), ("draft", "tolerance")]:
        cfg = tts.generation_config(plan, GenerationConfig(max_new_tokens=BIG, decoding=decoding,
                                                           accept=accept, seed=3))
        out = tts.engine.generate_batch([plan.prompt], [cfg], [tts.rule(plan)])[0].tokens
        phoneme, frames = None, 0
        for t in out:
            if lo <= t < tts.layout.phonemes[1]:
                phoneme = t - lo
            elif tts.layout.speech[0] <= t < tts.layout.speech[1]:
                assert tts.phoneme_masks[phoneme][t], (decoding, phoneme, t)
                frames += 1
        assert frames > 0


def test_phoneme_masks_cover_the_asked_share():
    from models.voices import interleaved

    layout = interleaved.token_layout(4)
    counts = np.zeros((interleaved.PHONEME_SLOTS, 4), dtype=np.int64)
    counts[0] = [5, 0, 3, 2]  # token 0 covers 50%, 0+2 80%, 0+2+3 100%
    masks = interleaved.phoneme_allowed_masks(layout, counts, 0.8, interleaved.vocab_size(4))
    speech = lambda m: m[layout.speech[0]:layout.speech[1]].tolist()  # noqa: E731
    assert speech(masks[0]) == [True, False, True, False] and masks[0][layout.eop]
    assert speech(masks[1]) == [True] * 4  # never seen in training: unconstrained
    assert speech(interleaved.phoneme_allowed_masks(layout, counts, 0.5, 649)[0]) == [True, False, False, False]
    assert speech(interleaved.phoneme_allowed_masks(layout, counts, 1.0, 649)[0]) == [True] * 4
    # counting: phoneme 3 spoken for 2 frames (tokens 1, 1), phoneme 7 for 1 frame (token 2)
    c = interleaved.phoneme_token_counts(np.array([3, 7]), np.array([2, 1]), np.array([1, 1, 2]), 4)
    assert c[3].tolist() == [0, 2, 0, 0] and c[7].tolist() == [0, 0, 1, 0] and c.sum() == 3


def test_frontend_durations_fix_every_phonemes_length(tiny_voice):
    """phoneme_durations="frontend": each phoneme lasts exactly espeak-ng's frames for it, in every
    mode, so the speech is as long as espeak-ng's; exact modes still equal plain."""
    tts = TextToSpeech(tiny_voice, max_batch=4, phoneme_durations="frontend")
    text = "Seven quick foxes, at 6:15."
    plan = tts.plan(text)[0]
    assert plan.durations is not None and len(plan.durations) == len(plan.phonemes)
    assert sum(plan.durations) == len(PristineEspeak().synthesize(normalize(text)).audio) // 441
    tts.plan("Something else entirely, spoken before it!")
    assert tts.plan(text)[0].durations == plan.durations  # the text alone decides
    lo, hi = tts.layout.phonemes
    outs = {}
    for decoding, accept in [("plain", "exact"), ("heads", "exact"), ("draft", "exact"),
                             ("heads", "tolerance"), ("draft", "tolerance"), ("draft", "lossless")]:
        cfg = tts.generation_config(plan, GenerationConfig(max_new_tokens=BIG, decoding=decoding,
                                                           accept=accept, seed=3))
        out = tts.engine.generate_batch([plan.prompt], [cfg], [tts.rule(plan)])[0]
        assert out.finish_reason == "eos"
        frames = []
        for t in out.tokens:
            if lo <= t < hi:
                frames.append(0)
            elif tts.layout.speech[0] <= t < tts.layout.speech[1]:
                frames[-1] += 1
        assert frames == plan.durations, (decoding, accept)
        outs[decoding, accept] = out.tokens
    assert outs["heads", "exact"] == outs["draft", "exact"] == outs["plain", "exact"]
    # past the end of speech (where drafts may run on) the rule forces nothing: a chain of forced
    # markers there once made a draft step verify thousands of rows
    rule = tts.rule(plan)
    state = rule.start()
    for t in outs["plain", "exact"]:
        state = rule.advance(state, t)
    for _ in range(3):
        assert rule.constraint(state).forced is None
        state = rule.advance(state, tts.layout.eop)
        state = rule.advance(state, rule.constraint(state).forced or tts.layout.eos)


def test_phoneme_durations_must_be_known(tiny_voice):
    with pytest.raises(ValueError, match="phoneme_durations"):
        TextToSpeech(tiny_voice, phoneme_durations="teacher")
