"""Which voice family a checkpoint directory belongs to.

Two families exist: "bundle" (SpecTTS's interleaved voices, a `spectts.json` bundle) and "orpheus"
(Orpheus-family Hugging Face checkpoints over SNAC 24 kHz codes, `models.voices.orpheus`). What the
engine needs from a family's text-to-speech object is `engine.families.VoiceFamily`.

A directory's family: its `spectts-family.json` when it has one (`{"family": "orpheus"}`, optionally
`"voices": ["alice", ...]` for a checkpoint fine-tuned on other speakers), else detected: a
checkpoint whose vocabulary and tokenizer have Orpheus's layout is Orpheus
(`models.voices.orpheus.is_orpheus`), anything else a bundle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PROFILE_FILE = "spectts-family.json"
FAMILIES = ("bundle", "orpheus")


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
