"""The interleaved (ELLA-V style) token layout of the speech LM.

    [BOS] P1 … Pn [SEP] P1 s s s EOP P2 s s EOP … Pn s s EOP EOS

The phoneme string first (global context), then each phoneme just before its own speech frames and an
end-of-phoneme marker. At inference each phoneme and the final EOS are forced (`InterleavedRule`); the
model decides only speech tokens and where each phoneme ends (or, given durations such as espeak-ng's,
only speech tokens: each marker is forced after its phoneme's frames). Loss on speech tokens, EOP and EOS.

Token ids: control tokens, then a reserved block of phoneme ids (the phoneme vocabulary may grow,
append-only, without moving the speech ids), then the speech tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file

from models.voices.bundle import TokenLayout
from models.voices.rules import InterleavedRule

PAD, BOS, SEP, EOP, EOS = 0, 1, 2, 3, 4
PHONEME_BASE = 5
PHONEME_SLOTS = 128
SPEECH_BASE = PHONEME_BASE + PHONEME_SLOTS
PHONEME_TOKENS_FILE = "phoneme_tokens.safetensors"  # per phoneme, how often each speech token was spoken


def token_layout(num_speech: int) -> TokenLayout:
    return TokenLayout(phonemes=(PHONEME_BASE, PHONEME_BASE + PHONEME_SLOTS),
                       speech=(SPEECH_BASE, SPEECH_BASE + num_speech),
                       bos=BOS, sep=SEP, eop=EOP, eos=EOS)


def vocab_size(num_speech: int) -> int:
    return SPEECH_BASE + num_speech


def prompt_ids(layout: TokenLayout, phonemes: list[int]) -> list[int]:
    """Phoneme-vocabulary ids -> the prompt `[BOS] P1 … Pn [SEP]`."""
    if any(not 0 <= p < layout.phonemes[1] - layout.phonemes[0] for p in phonemes):
        raise ValueError("phoneme id outside the layout's phoneme block")
    return [layout.bos, *(layout.phonemes[0] + p for p in phonemes), layout.sep]


def rule(layout: TokenLayout, phonemes: list[int], vocab: int, max_frames: int = 0,
         phoneme_masks: list[torch.Tensor] | None = None, durations: list[int] | None = None
         ) -> InterleavedRule:
    """The forced-token rule that generates `phonemes`' speech after `prompt_ids`. Without
    `phoneme_masks` any speech token (or EOP) may follow a phoneme; with them (from
    `phoneme_allowed_masks`, indexed by phoneme-vocabulary id) only that phoneme's tokens (or EOP).
    With `durations` (frames per phoneme) every phoneme ends after exactly that many frames."""
    if phoneme_masks is None:
        allowed = torch.zeros(vocab, dtype=torch.bool)
        allowed[layout.speech[0]:layout.speech[1]] = True
        allowed[layout.eop] = True
        masks: torch.Tensor | list[torch.Tensor] = allowed
    else:
        masks = [phoneme_masks[p] for p in phonemes]
    return InterleavedRule([layout.phonemes[0] + p for p in phonemes], masks, layout.eop,
                           layout.eos, max_frames=max_frames, durations=durations)


def phoneme_token_counts(phonemes: np.ndarray, durations: np.ndarray, tokens: np.ndarray,
                         num_speech: int) -> np.ndarray:
    """(PHONEME_SLOTS, num_speech) int64: how often each speech token was spoken in each phoneme.
    phonemes, durations (N,) per phoneme; tokens (sum(durations),) codebook ids."""
    counts = np.zeros((PHONEME_SLOTS, num_speech), dtype=np.int64)
    np.add.at(counts, (np.repeat(phonemes, durations), tokens), 1)
    return counts


def save_phoneme_counts(directory: Path, counts: np.ndarray, coverage: float) -> dict:
    """Write DIRECTORY/phoneme_tokens.safetensors: each phoneme's counts as a float16 share of its
    most frequent token's (half the bytes of int32; only their order and ratios are used);
    returns the bundle's `phoneme_tokens` entry."""
    top = np.maximum(counts.max(axis=1, keepdims=True), 1)
    save_file({"shares": torch.from_numpy((counts / top).astype(np.float16))},
              str(directory / PHONEME_TOKENS_FILE))
    return {"file": PHONEME_TOKENS_FILE, "coverage": coverage}


def load_phoneme_counts(directory: Path, entry: dict) -> np.ndarray:
    """The counts (or float16 shares) a bundle's `phoneme_tokens` entry points at, as float32
    (PHONEME_SLOTS, num_speech)."""
    tensors = load_file(str(directory / entry["file"]))
    return tensors["shares" if "shares" in tensors else "counts"].astype(np.float32)


def phoneme_allowed_masks(layout: TokenLayout, counts: np.ndarray, coverage: float, vocab: int
                          ) -> list[torch.Tensor]:
    """Per phoneme id, a (vocab,) bool mask: EOP plus the fewest speech tokens that cover `coverage` of
    that phoneme's training frames (the issue's phoneme-aware output constraint). A phoneme never
    seen in training, or coverage >= 1, allows every speech token."""
    lo, hi = layout.speech
    masks = []
    for row in counts:
        allowed = torch.zeros(vocab, dtype=torch.bool)
        allowed[layout.eop] = True
        total = row.sum()
        if total == 0 or coverage >= 1.0:
            allowed[lo:hi] = True
        else:
            order = np.argsort(-row, kind="stable")
            keep = int(np.searchsorted(np.cumsum(row[order]), coverage * total)) + 1
            allowed[lo + torch.from_numpy(order[:keep])] = True
        masks.append(allowed)
    return masks


def speech_tokens(layout: TokenLayout, generated: list[int]) -> list[int]:
    """Generated LM tokens -> speech token ids (0-based codebook ids), control and phonemes dropped."""
    lo, hi = layout.speech
    return [t - lo for t in generated if lo <= t < hi]


def training_sequence(phonemes: np.ndarray, durations: np.ndarray, tokens: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """One utterance -> (ids (L,), loss mask (L,)): mask[t] says whether ids[t] is a target
    (speech, EOP or EOS), i.e. whether the prediction made at t - 1 is trained."""
    ids = [BOS, *(PHONEME_BASE + int(p) for p in phonemes), SEP]
    target = [False] * len(ids)
    frame = 0
    for p, d in zip(phonemes, durations):
        ids.append(PHONEME_BASE + int(p))
        target.append(False)  # forced at inference
        ids.extend(SPEECH_BASE + int(t) for t in tokens[frame:frame + d])
        target.extend([True] * int(d))
        frame += int(d)
        ids.append(EOP)
        target.append(True)
    ids.append(EOS)
    target.append(False)  # forced after the last EOP
    return np.asarray(ids, dtype=np.int64), np.asarray(target, dtype=bool)
