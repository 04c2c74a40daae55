"""Tests for the voice training-text corpus builder (models/recipes/corpus.py)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from models.recipes import corpus

N = 2000


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    assert corpus.build_corpus(out, target_sentences=N, seed=0) == N
    return out


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[:-1]


def test_eval_sentences_are_well_formed() -> None:
    sentences = corpus.load_eval_sentences()
    assert len(sentences) == 150
    assert len({s.lower() for s in sentences}) == 150
    for s in sentences:
        assert 5 <= len(s.split()) <= 20, s
        assert s.isascii() and s[0].isupper() and s[-1] in ".?!", s
    assert sum(bool(re.search(r"\d", s)) for s in sentences) >= 20


def test_lines_are_sane(built: Path) -> None:
    lines = _lines(built)
    assert len(lines) == N
    assert all(line.strip() == line and line and len(line) <= corpus.MAX_CHARS for line in lines)
    assert len({corpus._norm(line) for line in lines}) == N  # deduplicated
    assert sum(corpus.source_counts(built).values()) == N


def test_deterministic(built: Path, tmp_path: Path) -> None:
    again = tmp_path / "again.txt"
    corpus.build_corpus(again, target_sentences=N, seed=0)
    assert again.read_bytes() == built.read_bytes()
    other = tmp_path / "other.txt"
    corpus.build_corpus(other, target_sentences=N, seed=1)
    assert other.read_bytes() != built.read_bytes()


def test_no_eval_sentence(built: Path) -> None:
    keys = [f" {corpus._norm(s)} " for s in corpus.load_eval_sentences()]
    for line in _lines(built):
        padded = f" {corpus._norm(line)} "
        assert not any(k in padded for k in keys), line


def test_eval_sentences_are_filtered_out(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    evals = corpus.load_eval_sentences()
    planted = [evals[0], evals[1].upper().rstrip(".?!"), f"Then he said: {evals[2]} And left.",
               "This harmless fortune sentence should survive the filter."]
    monkeypatch.setattr(corpus, "fortune_sentences", lambda: list(planted))
    out = tmp_path / "c.txt"
    corpus.build_corpus(out, target_sentences=200, seed=0)
    text = out.read_text(encoding="utf-8")
    assert planted[3] in text
    assert all(p not in text for p in planted[:3])


def test_template_categories(built: Path) -> None:
    text = built.read_text(encoding="utf-8")
    for needle in ["?", "!", ",", '"', "(", "%", "$", ":", "Dr.", "Mr"]:
        assert needle in text, needle
    lines = _lines(built)
    assert sum(bool(re.search(r"\d", line)) for line in lines) >= N // 10
    assert any(re.search(r"\b\d{1,2}:\d\d\b", line) for line in lines)  # times
    assert any(re.search(r"\b(?:January|March|June|October)\b", line) for line in lines)  # dates
    assert any(re.search(r"\b\d+(?:st|nd|rd|th)\b", line) for line in lines)  # ordinals
    assert any(re.search(r"[€£]\d", line) for line in lines)  # other currencies
    assert corpus.source_counts(built)["template"] >= N // 10


def test_fortune_lines(built: Path) -> None:
    if not corpus.FORTUNE_DIR.is_dir():
        pytest.skip(f"{corpus.FORTUNE_DIR} missing: apt-get install fortune-mod fortunes fortunes-min")
    assert corpus.source_counts(built)["fortune"] >= N // 4
    sentences = corpus.fortune_sentences()
    assert len(sentences) > 5000
    assert all(4 <= len(s.split()) <= 30 and "--" not in s for s in sentences)


def test_word_list_lines(built: Path) -> None:
    if not corpus.WORDLIST.is_file():
        pytest.skip(f"{corpus.WORDLIST} missing: apt-get install wamerican")
    words = corpus.load_words()
    assert len(words) > 20000 and all(re.fullmatch(r"[a-z]+", w) for w in words)
    assert corpus.source_counts(built)["words"] >= N // 10


def test_split_sentences_keeps_abbreviations() -> None:
    text = "Dr. Smith arrived at 5 p.m. on Friday. He left early! Did Mr. Jones stay?"
    assert corpus.split_sentences(text) == [
        "Dr. Smith arrived at 5 p.m. on Friday.", "He left early!", "Did Mr. Jones stay?"]
