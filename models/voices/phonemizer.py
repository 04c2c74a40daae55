"""Phonemizers: a sentence -> the phone names a voice's LM reads, and, when the voice forces them,
each phone's frames.

A voice bundle names its frontend in `spectts.json`:
- `{"kind": "festival", "phonemes": "phonemes.json"}`: Festival's front end (SLT HTS voice), phones
  with stress and accent marks (`models.voices.festival`); forced durations come from HTS synthesis
  (~90 ms a sentence), so such voices let the LM end its phones (`phoneme_durations: model`);
- `{"voice": "en-us", "phonemes": "phonemes.json"}` (no kind, or `"kind": "espeak"`): espeak-ng's
  phonemes after the project's normaliser; forced durations from `PristineEspeak` (each text
  spoken from the same fresh state, so the same text always gets the same frames).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Phones:
    names: list[str]
    frames: list[int] | None  # per phone, when durations are forced; None: the model decides

    def speakable(self, pauses: frozenset[str]) -> bool:
        return any(n not in pauses for n in self.names)


class Phonemizer(Protocol):
    pauses: frozenset[str]  # phone names that are silence only

    def phonemize(self, sentence: str) -> Phones: ...


class EspeakPhonemizer:
    pauses = frozenset({"_", "_:", "_!", "_|"})

    def __init__(self, voice: str, hop: int, forced: bool) -> None:
        from models.voices.frontend import Espeak, PristineEspeak

        self.hop, self.forced = hop, forced
        # forced durations must depend on the text alone, not on what espeak-ng spoke before
        self.espeak = (PristineEspeak if forced else Espeak)(voice)
        self.espeak.synthesize("")  # fail (or start PristineEspeak's helper) now, not on a request

    def phonemize(self, sentence: str) -> Phones:
        from models.voices.frontend import normalize

        utt = self.espeak.synthesize(normalize(sentence))
        return Phones(utt.phonemes, utt.frame_durations(self.hop).tolist() if self.forced else None)


class FestivalPhonemizer:
    pauses = frozenset({"pau", "pau?", "pau!"})

    def __init__(self, hop: int, sample_rate: int, forced: bool, timeout_s: float = 5.0) -> None:
        from models.voices.festival import Festival

        self.hop, self.sample_rate, self.forced = hop, sample_rate, forced
        self.festival = Festival(sample_rate=sample_rate, timeout_s=timeout_s)
        self.festival.phones("Ready.")  # start the worker now, not on a request

    def phonemize(self, sentence: str) -> Phones:
        from models.voices.festival import FestivalError, fold

        try:
            if not self.forced:
                return Phones(self.festival.phones(fold(sentence)).phones, None)
            utt = self.festival.synthesize(fold(sentence))
            return Phones(utt.phones, utt.frame_durations(self.hop, self.sample_rate).tolist())
        except FestivalError as e:
            raise ValueError(f"the text frontend could not read this text: {e}") from e


def make_phonemizer(front: dict, hop: int, sample_rate: int, forced: bool) -> Phonemizer:
    """The phonemizer a bundle's `frontend` entry names."""
    kind = front.get("kind", "espeak")
    if kind == "festival":
        return FestivalPhonemizer(hop, sample_rate, forced)
    if kind == "espeak":
        return EspeakPhonemizer(front.get("voice", "en-us"), hop, forced)
    raise ValueError(f"unknown frontend kind {kind!r} (festival or espeak)")
