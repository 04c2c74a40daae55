"""Per-sequence token rules: forced tokens and allowed-token masks.

A rule is a small state machine over the generated tokens. Decoding asks `constraint(state)` before
every position: a forced token is appended without sampling (and verification never rejects it), an
allowed mask restricts what may be sampled or accepted. Trees and drafts continue past forced tokens by
advancing the state along each candidate path, so every mode sees the same constraints as plain decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Protocol

import torch


@dataclass(frozen=True)
class Constraint:
    forced: int | None = None  # the next token is this one
    allowed: torch.Tensor | None = None  # (V,) bool: the next token must be one of these


FREE = Constraint()


class TokenRule(Protocol):
    def start(self) -> Hashable:
        """State before the first generated token."""

    def advance(self, state: Hashable, token: int) -> Hashable:
        """State after `token` was generated in `state`."""

    def constraint(self, state: Hashable) -> Constraint:
        """What the next token may be."""


class NoRule:
    """Free decoding."""

    def start(self) -> Hashable:
        return None

    def advance(self, state: Hashable, token: int) -> Hashable:
        return None

    def constraint(self, state: Hashable) -> Constraint:
        return FREE


class InterleavedRule:
    """ELLA-V-style interleaving: p1 s s … EOP p2 s s … EOP … pn s … EOP EOS.

    Each phoneme is forced; after it only speech tokens or the end-of-phoneme marker may follow (one
    mask for all phonemes, or one per phoneme: e.g. the tokens that phoneme was spoken with); after
    the last phoneme's marker the end of speech is forced. `max_frames` (optional) forces the marker
    after that many speech tokens of one phoneme, so a phoneme can never run on. `durations` (optional,
    frames per phoneme, e.g. the frontend's) fixes every phoneme's length instead: the marker is
    forced after exactly that many speech tokens and never allowed before.
    State: (index of the current phoneme, speech frames emitted for it; -1 while the phoneme is due).
    """

    def __init__(self, phonemes: list[int], speech_and_eop: torch.Tensor | list[torch.Tensor],
                 eop: int, eos: int, max_frames: int = 0, durations: list[int] | None = None
                 ) -> None:
        if not phonemes:
            raise ValueError("an interleaved rule needs at least one phoneme")
        self.phonemes, self.eop, self.eos, self.max_frames = list(phonemes), eop, eos, max_frames
        if isinstance(speech_and_eop, torch.Tensor):  # one (V,) mask for every phoneme
            speech_and_eop = [speech_and_eop] * len(self.phonemes)
        if len(speech_and_eop) != len(self.phonemes):
            raise ValueError("one allowed mask per phoneme")
        self.durations = None if durations is None else [int(d) for d in durations]
        if self.durations is not None:
            if len(self.durations) != len(self.phonemes) or min(self.durations) < 0:
                raise ValueError("one non-negative duration per phoneme")
            speech_only: dict[int, torch.Tensor] = {}  # masks are shared between phonemes: one copy each
            for m in speech_and_eop:
                if id(m) not in speech_only:
                    speech_only[id(m)] = m.clone()
                    speech_only[id(m)][eop] = False
            speech_and_eop = [speech_only[id(m)] for m in speech_and_eop]
        self._speech = [Constraint(allowed=m) for m in speech_and_eop]
        self._eop = Constraint(forced=eop)
        self._end = Constraint(forced=eos)

    def start(self) -> tuple[int, int]:
        return (0, -1)

    def advance(self, state: tuple[int, int], token: int) -> tuple[int, int]:
        idx, frames = state
        if frames < 0:  # phoneme idx (or the end) was just emitted
            return (idx, 0)
        if token == self.eop:
            return (idx + 1, -1)
        return (idx, frames + 1)

    def constraint(self, state: tuple[int, int]) -> Constraint:
        idx, frames = state
        if frames < 0:
            return self._end if idx >= len(self.phonemes) else Constraint(forced=self.phonemes[idx])
        if idx >= len(self.phonemes):  # past the end of speech (drafts only): never force, or a
            return self._speech[-1]     # chain of forced markers would never end
        if self.durations is not None:
            return self._eop if frames >= self.durations[idx] else self._speech[idx]
        if self.max_frames and frames >= self.max_frames:
            return self._eop
        return self._speech[idx]
