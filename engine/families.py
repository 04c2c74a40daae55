"""Voice families: what the service, the server and the CLI need from a model family, in one place,
and how a checkpoint's family is found.

A family is the knowledge that turns text into an LM's prompt and its tokens into audio; the engine
never changes for one. Two exist:
- "bundle": SpecTTS's interleaved voices (`engine.tts.TextToSpeech`; a `spectts.json` bundle:
  espeak-ng phonemes forced between speech tokens, a streaming Vocos vocoder);
- "orpheus": Orpheus-family checkpoints (`engine.orpheus_tts.OrpheusTTS`; Llama-3.2 over SNAC
  24 kHz codes, `models.voices.orpheus`).
Another family (Llasa + XCodec2, OuteTTS + DAC) is one more class with the surface `VoiceFamily`
states, a check of its checkpoint, and an entry in `load_tts` / `family_of`.

Which family a directory is: its `spectts-family.json` when it has one (`{"family": "orpheus"}`,
optionally `"voices": ["alice", ...]` for a checkpoint fine-tuned on other speakers), else detected:
a `spectts.json` is a bundle; a Hugging Face checkpoint whose vocabulary and tokenizer have
Orpheus's layout is Orpheus (`models.voices.orpheus.check_checkpoint`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Hashable, Protocol, Sequence

import numpy as np

from engine.engine import Engine
from engine.rules import TokenRule
from engine.sampling import SamplingParams
from engine.types import GenerationConfig

PROFILE_FILE = "spectts-family.json"
FAMILIES = ("bundle", "orpheus")


class VoiceFamily(Protocol):
    """The surface of a family's text-to-speech object. A *plan* is one sentence's prompt (the
    family's own dataclass with `.text` and `.prompt`, token ids); a *frame* is the codec's unit
    (a speech token for the bundles, 7 tokens = one SNAC frame for Orpheus)."""

    engine: Engine  # the decode core, holding the checkpoint (and its draft / heads)
    name: str  # the model id the API lists
    voices: Sequence[str]  # speakers; requests name one (OpenAI's names alias the default)
    default_voice: str
    sampling_defaults: SamplingParams  # the family's recommended sampling
    sample_rate: int  # of the audio
    hop: int  # audio samples per frame
    lookahead_samples: int  # samples the streaming decoder holds back (its fixed latency)

    def plan(self, text: str, max_chars: int = 300, voice: str | None = None) -> list:
        """Prompt builder: text -> one plan per sentence; ValueError for empty text or an unknown
        voice (naming the voices)."""

    def rule(self, plan) -> TokenRule:
        """The decoding rule of the plan's answer (forced tokens, allowed masks), honoured alike by
        plain decoding, draft heads and a draft model."""

    def generation_config(self, plan, cfg: GenerationConfig) -> GenerationConfig:
        """`cfg` capped for this plan (its longest answer)."""

    def check(self, cfg: GenerationConfig) -> None:
        """ValueError for a config the engine cannot run with this checkpoint."""

    def take_frames(self, tokens: list[int], scanned: int) -> tuple[list, int]:
        """The codec frames among generated tokens[scanned:], and how far they were read."""

    def stream_decoder(self) -> Hashable:
        """A streaming codec decoder for one utterance (push frames, flush at the end)."""

    def push_many(self, decoders: list, frames: list[list]) -> list[np.ndarray]:
        """Push each decoder its new frames, batched across streams; the audio now final."""

    def synthesize(self, text: str, cfg: GenerationConfig | None = None, speed: float = 1.0,
                   voice: str | None = None):
        """Offline synthesis (`engine.tts.Speech`), equal to what the streaming path sends."""


@dataclass(frozen=True)
class Profile:
    """A checkpoint's `spectts-family.json`: the family it belongs to, and (Orpheus) the speakers
    it was fine-tuned on when they are not Orpheus's."""

    family: str
    voices: tuple[str, ...] | None = None


def read_profile(path: str | Path) -> Profile | None:
    """The directory's profile, None without one; ValueError naming what is wrong in it."""
    file = Path(path) / PROFILE_FILE
    if not file.exists():
        return None
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file} is not JSON: {exc}") from None
    if not isinstance(raw, dict) or raw.get("family") not in FAMILIES:
        raise ValueError(f"{file}: \"family\" must be one of {', '.join(FAMILIES)}")
    unknown = set(raw) - {"family", "voices"}
    if unknown:
        raise ValueError(f"{file}: unknown keys {sorted(unknown)} (only family and voices)")
    voices = raw.get("voices")
    if voices is not None and (not isinstance(voices, list) or not voices
                               or not all(isinstance(v, str) and v.strip() for v in voices)):
        raise ValueError(f"{file}: \"voices\" must be a non-empty list of names")
    return Profile(raw["family"], tuple(voices) if voices else None)


def family_of(path: str | Path) -> str:
    """"orpheus" or "bundle": the profile's word, else detection (see the module docstring)."""
    from models.voices import orpheus

    profile = read_profile(path)
    if profile is not None:
        return profile.family
    return "orpheus" if orpheus.is_orpheus(Path(path)) else "bundle"
