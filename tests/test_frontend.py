"""Tests for models/voices/frontend.py: espeak-ng through ctypes, normalisation, splitting, phoneme ids."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from models.voices.frontend import (
    EN_US_PHONEMES,
    PAD,
    Espeak,
    EspeakUnavailable,
    PhonemeVocab,
    PristineEspeak,
    Utterance,
    normalize,
    split_sentences,
)

SENTENCES = [
    "Hello, world.",
    "The quick brown fox jumps over the lazy dog!",
    "Is it three o'clock yet? No; it's twenty past two.",
    "Doctor Smith paid three dollars and fifty cents (not four) for a café au lait.",
    "",
]
ODD_INPUTS = ["", "   ", "...", "?!;,", "😀🎉", "\x00\x01\x07\x1b[31m", "x" * 2000, "a\u200bb\ufeffc",
              "\ud800 lone surrogate", "ʃʒθ ñ ü 中文 русский नमस्ते", "<speak>tags</speak> [[h@l'oU]]",
              "1" * 60]


@pytest.fixture(scope="module")
def espeak() -> Espeak:
    try:
        return Espeak()
    except EspeakUnavailable as e:
        pytest.skip(f"libespeak-ng not available: {e}")


# ---- espeak-ng -------------------------------------------------------------------------------


def test_synthesize_audio_and_starts(espeak: Espeak) -> None:
    assert espeak.sample_rate == 22050
    utt = espeak.synthesize("The quick brown fox jumps over the lazy dog.")
    assert isinstance(utt, Utterance)
    assert utt.audio.dtype == np.float32 and utt.audio.ndim == 1
    assert 1.0 < len(utt.audio) / espeak.sample_rate < 4.0  # about 2 s of speech
    assert np.abs(utt.audio).max() <= 1.0 and np.abs(utt.audio).max() > 0.05
    assert len(utt.phonemes) == len(utt.starts) > 25
    assert all(0 <= s <= len(utt.audio) for s in utt.starts)
    assert utt.starts == sorted(utt.starts)
    assert utt.phonemes[:3] == ["D", "@2", "k"] and utt.phonemes[-2:] == ["_:", "_"]


def test_frame_durations_split_the_audio_at_the_phoneme_starts() -> None:
    audio = np.zeros(10 * 441 + 100, dtype=np.float32)  # 10 whole frames
    utt = Utterance(audio=audio, phonemes=["_", "h", "@", "l", "oU"],
                    starts=[300, 441 * 2 + 100, 441 * 2 + 300, 441 * 5, 441 * 12])
    # the first phoneme takes the leading frames, starts round to the nearest frame (2.23 -> 2,
    # 2.68 -> 3), a phoneme that starts past the end gets none
    assert utt.frame_durations(441).tolist() == [2, 1, 2, 5, 0]


def test_longer_text_gives_longer_audio_and_starts_reset(espeak: Espeak) -> None:
    short = espeak.synthesize("Hi.")
    long = espeak.synthesize("Hi. " * 6)
    assert len(long.audio) > 4 * len(short.audio)
    assert long.starts[0] < 0.05 * espeak.sample_rate  # positions restart with every message


@pytest.mark.parametrize("text", SENTENCES)
def test_phonemize_matches_synthesize(espeak: Espeak, text: str) -> None:
    assert espeak.phonemize(text) == espeak.synthesize(text).phonemes


def test_phonemes_do_not_depend_on_history(espeak: Espeak) -> None:
    first = espeak.phonemize(SENTENCES[2])
    espeak.synthesize("x" * 500)
    espeak.synthesize(SENTENCES[3])
    assert espeak.phonemize(SENTENCES[2]) == first


def test_audio_reproducible_in_a_fresh_process(espeak: Espeak) -> None:
    code = (
        "import hashlib; from models.voices.frontend import Espeak; e = Espeak(); h = hashlib.sha256()\n"
        f"for t in {SENTENCES!r}:\n"
        "    u = e.synthesize(t); h.update(u.audio.tobytes()); h.update(repr(u.starts).encode())\n"
        "print(h.hexdigest())"
    )
    root = Path(__file__).resolve().parents[1]
    runs = [subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                           timeout=60).stdout for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0].strip()) == 64


def test_phoneme_names(espeak: Espeak) -> None:
    phonemes = espeak.phonemize(normalize("Hello, world. It's 3 o'clock! Strawberry?"))
    assert phonemes[:4] == ["h", "@", "l", "oU"]  # no stress marks in the event names
    assert phonemes[4:6] == ["_:", "_"]  # the comma: a pause, then the clause end
    assert not any("'" in p or "," in p for p in phonemes)
    assert all(p in EN_US_PHONEMES for p in phonemes)


def test_threads_share_one_library(espeak: Espeak) -> None:
    expected = espeak.phonemize(SENTENCES[1])
    results: list[list[str]] = []
    def work() -> None:
        results.append(Espeak().phonemize(SENTENCES[1]))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 4


@pytest.mark.parametrize("text", ODD_INPUTS)
def test_odd_input_never_raises(espeak: Espeak, text: str) -> None:
    for t in (text, normalize(text)):
        utt = espeak.synthesize(t)
        assert len(utt.phonemes) == len(utt.starts)
        assert espeak.phonemize(t) == utt.phonemes
        assert all(isinstance(i, int) for i in PhonemeVocab().to_ids(utt.phonemes))


# ---- normalize -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$3.50", ["three dollars", "fifty cents"]),
        ("It costs $1.", ["one dollar."]),
        ("£5.25 or €1,200", ["five pounds", "twenty-five pence", "one thousand two hundred euros"]),
        ("$0.99", ["ninety-nine cents"]),
        ("$2.5 million", ["two point five million dollars"]),
        ("1,234,567", ["one million two hundred thirty-four thousand five hundred sixty-seven"]),
        ("pi is 3.14", ["three point one four"]),
        ("the 21st and 2nd", ["twenty-first", "second"]),
        ("in 1999 and 2024", ["nineteen ninety-nine", "twenty twenty-four"]),
        ("the 1990s", ["nineteen nineties"]),
        ("50% off", ["fifty percent off"]),
        ("at 3:30 pm", ["three thirty PM"]),
        ("at 7:05 or 12:00", ["seven oh five", "twelve o'clock"]),
        ("March 15, 2024", ["March fifteenth", "twenty twenty-four"]),
        ("2024-03-15", ["March fifteenth"]),
        ("on the 4th of July", ["on the fourth of July"]),
        ("Dr. Smith and Mrs. Jones", ["Doctor Smith", "Missus Jones"]),
        ("St. Louis, Main St. here", ["Saint Louis", "Main Street"]),
        ("e.g. this, i.e. that", ["for example", "that is"]),
        ("you & me + 2 = 5", ["you and me plus two equals five"]),
        ("me@home #1", ["at home", "number one"]),
        ("-5 degrees", ["minus five"]),
        ("“Hi” — she said…", ['"Hi", she said...']),
        ("007", ["zero zero seven"]),
    ],
)
def test_normalize(text: str, expected: list[str]) -> None:
    out = normalize(text)
    for words in expected:
        assert words in out, (text, out)
    assert not any(c.isdigit() for c in out)


def test_normalize_cleans_whitespace_and_controls() -> None:
    assert normalize("  a\t\x00b\u200b  \n\n c\x07 ") == "a b c"
    assert normalize("Wow!!! Really?!") == "Wow! Really?"
    assert normalize("I ❤ it 😀.") == "I it."


@pytest.mark.parametrize("text", ODD_INPUTS + ["9" * 400, "$", "%%%", "1/0", "99:99", "#", "Jan 99"])
def test_normalize_odd_input(text: str) -> None:
    out = normalize(text)
    assert isinstance(out, str) and "\n" not in out and normalize(text) == out


# ---- split_sentences -------------------------------------------------------------------------


def test_split_sentences() -> None:
    assert split_sentences("Hello. World!") == ["Hello.", "World!"]
    assert split_sentences("Dr. Smith paid 3.5 dollars. Then he left.") == [
        "Dr. Smith paid 3.5 dollars.", "Then he left."]
    assert split_sentences("Why? Because; fine.\nNext line e.g. this") == [
        "Why?", "Because;", "fine.", "Next line e.g. this"]
    assert split_sentences("J. K. Rowling wrote it.") == ["J. K. Rowling wrote it."]
    assert split_sentences("") == [] and split_sentences(" ... !! \n") == []


def test_split_long_sentences() -> None:
    text = "one two three, " * 40 + "end"
    pieces = split_sentences(text, max_chars=100)
    assert all(len(p) <= 100 for p in pieces) and len(pieces) > 5
    assert all(p.endswith(",") for p in pieces[:-1])  # cut at commas when there are some
    assert " ".join(pieces).split() == text.split()
    assert all(len(p) <= 50 for p in split_sentences("w" * 500, max_chars=50))


# ---- PhonemeVocab ----------------------------------------------------------------------------


def test_vocab_roundtrip(tmp_path) -> None:
    vocab = PhonemeVocab()
    assert len(vocab) == len(EN_US_PHONEMES) and vocab.pad_id == 0 and vocab.phonemes[0] == PAD
    names = ["h", "@", "l", "oU", "_:", "_"]
    ids = vocab.to_ids(names)
    assert 0 not in ids and vocab.from_ids(ids) == names
    vocab.save(tmp_path / "phonemes.json")
    assert PhonemeVocab.load(tmp_path / "phonemes.json") == vocab
    with pytest.raises(ValueError):
        vocab.from_ids([len(vocab)])


def test_vocab_unknown_fallback() -> None:
    vocab = PhonemeVocab()
    assert vocab.resolve("oU#") == "oU" and vocab.resolve("_::") == "_:"
    assert vocab.resolve("R2") == "r" and vocab.resolve("L/") == "l"
    assert vocab.resolve("") == "_" and vocab.resolve("ʃ") == "_" and vocab.resolve("qq") == "_"
    assert vocab.to_ids(["oU#", "???"]) == vocab.to_ids(["oU", "?"])


def test_vocab_covers_espeak(espeak: Espeak) -> None:
    text = normalize("Strawberries, jalapeños & 3,000 zebras — at 9:45 a.m. on July 4th! "
                     "Bach's loch, the rendezvous in Zürich; Björk sang 'Oh' quietly.")
    known = set(EN_US_PHONEMES)
    assert [p for p in espeak.phonemize(text) if p not in known] == []


def test_pristine_espeak_timings_depend_on_the_text_alone(espeak: Espeak) -> None:
    """In-process espeak-ng carries state from one text to the next (its phoneme starts move by a
    few ms); PristineEspeak speaks each text from the same fresh state."""
    pristine = PristineEspeak()
    try:
        first = pristine.synthesize(SENTENCES[0])
        for text in SENTENCES[1:]:
            espeak.synthesize(text)
            pristine.synthesize(text)
        again = pristine.synthesize(SENTENCES[0])
        assert again.phonemes == first.phonemes == espeak.phonemize(SENTENCES[0])
        assert again.starts == first.starts and np.array_equal(again.audio, first.audio)
        with pytest.raises(RuntimeError, match="no voice"):
            PristineEspeak("no-such-voice").synthesize("Hello.")
    finally:
        pristine.close()
