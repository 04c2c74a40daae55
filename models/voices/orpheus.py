"""The Orpheus family (canopyai/Orpheus-TTS): a Llama-3.2 LM over SNAC 24 kHz codes.

Read from the project's own code (github.com/canopyai/Orpheus-TTS, `orpheus_tts_pypi/orpheus_tts/`):
- prompt of the finetuned models (`engine_class.py`, `_format_prompt`):
      [START_OF_HUMAN] + tokenizer(f"{voice}: {text}") + [END_OF_TEXT, END_OF_HUMAN, START_OF_AI,
      START_OF_SPEECH]
  where `tokenizer(...)` is Llama 3's, its own BOS (<|begin_of_text|>, 128000) included; tags such as
  <laugh> are plain text. Generation stops at END_OF_SPEECH (`realtime_streaming_example/main.py`:
  stop_token_ids [128258]).
- audio tokens (`decoder.py`, `turn_token_into_id`): <custom_token_N> is id 128256 + N; the k-th
  audio token of the answer (slot i = k mod 7) carries code N - 10 - 4096 i, i.e.
  id - 128266 - 4096 i; a frame is 7 tokens: slot 0 -> codebook 0, slots 1 and 4 -> codebook 1,
  slots 2, 3, 5, 6 -> codebook 2 (`convert_to_audio`). Its streaming drops code 0 (`if token > 0`);
  here code 0 is a code like any other.
- voices (README, "in order of conversational realism"): tara, leah, jess, leo, dan, mia, zac, zoe.
- sampling (`engine_class.py`, `generate_tokens_sync` defaults): temperature 0.6, top_p 0.8,
  repetition_penalty 1.3 (vLLM's penalty: over every earlier token, prompt included). The README
  says repetition_penalty >= 1.1 is required for stable output; its realtime example uses 0.4 / 0.9
  / 1.1.
- checkpoint (orpheus-3b-0.1-ft's config.json): Llama, vocab 156940, 28 layers, hidden 3072, tied
  embeddings, rope_scaling llama3, bf16, sharded safetensors with an index.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from models.voices.rules import Constraint

BEGIN_OF_TEXT = 128000  # <|begin_of_text|>: the tokenizer's BOS
END_OF_TEXT = 128009  # <|eot_id|>
CUSTOM_TOKEN_BASE = 128256  # <custom_token_N> = 128256 + N
START_OF_SPEECH = 128257
END_OF_SPEECH = 128258
START_OF_HUMAN = 128259
END_OF_HUMAN = 128260
START_OF_AI = 128261
AUDIO_BASE = 128266  # <custom_token_10>: slot 0, code 0
CODES = 4096  # codes per SNAC codebook
SLOTS = 7  # audio tokens per frame
AUDIO_END = AUDIO_BASE + SLOTS * CODES  # 156938: first id after the audio tokens
# the codec's frame order (c0, c1[2f], c1[2f+1], c2[4f], …, c2[4f+3]) from Orpheus's slots:
# column j of a codec frame is the code of slot SLOT_OF_COLUMN[j]
SLOT_OF_COLUMN = (0, 1, 4, 2, 3, 5, 6)
COLUMN_OF_SLOT = tuple(SLOT_OF_COLUMN.index(s) for s in range(SLOTS))

VOICES = ("tara", "leah", "jess", "leo", "dan", "mia", "zac", "zoe")  # the first is the default
# orpheus_tts's generate_tokens_sync defaults, as the engine's SamplingParams fields; the window
# covers a whole sentence and its prompt, as vLLM's penalty (every earlier token) does
SAMPLING = {"temperature": 0.6, "top_p": 0.8, "repetition_penalty": 1.3,
            "repetition_window": 4096}
# generation cap per sentence (no end of speech by then: stopped, stats.truncated): this many
# seconds plus this many per character of text; speech runs at ~14 characters per second
MIN_SECONDS, SECONDS_PER_CHAR = 1.0, 0.15
SPECIAL_NAMES = {START_OF_SPEECH: "<custom_token_1>", END_OF_SPEECH: "<custom_token_2>",
                 START_OF_HUMAN: "<custom_token_3>", END_OF_HUMAN: "<custom_token_4>",
                 START_OF_AI: "<custom_token_5>", AUDIO_BASE: "<custom_token_10>"}


def prompt_ids(text_ids: list[int]) -> list[int]:
    """The tokenizer's ids of f"{voice}: {text}" (its BOS included) -> the finetuned models' prompt."""
    return [START_OF_HUMAN, *text_ids, END_OF_TEXT, END_OF_HUMAN, START_OF_AI, START_OF_SPEECH]


def prompt_text(voice: str, text: str) -> str:
    return f"{voice}: {text}"


def max_new_tokens(text: str, frame_seconds: float) -> int:
    """The generation cap of one sentence: whole frames, plus the end of speech."""
    frames = math.ceil((MIN_SECONDS + SECONDS_PER_CHAR * len(text)) / frame_seconds)
    return SLOTS * frames + 1


def codes_from_tokens(tokens: list[int] | np.ndarray) -> np.ndarray:
    """Audio token ids, whole frames in slot order -> codec frames (N, 7) in the codec's order.
    ValueError for a token outside its slot's range (or a partial frame)."""
    ids = np.asarray(tokens, dtype=np.int64)
    if len(ids) % SLOTS:
        raise ValueError(f"{len(ids)} audio tokens are not whole frames of {SLOTS}")
    codes = ids.reshape(-1, SLOTS) - AUDIO_BASE - CODES * np.arange(SLOTS)  # (N, 7) per slot
    if codes.size and (codes.min() < 0 or codes.max() >= CODES):
        raise ValueError("an audio token lies outside its slot's id range")
    return codes[:, SLOT_OF_COLUMN]


def tokens_from_codes(frames: np.ndarray) -> list[int]:
    """Codec frames (N, 7) in the codec's order -> audio token ids in slot order (the inverse)."""
    frames = np.asarray(frames, dtype=np.int64).reshape(-1, SLOTS)
    slots = frames[:, COLUMN_OF_SLOT]  # (N, 7) per slot
    return (slots + AUDIO_BASE + CODES * np.arange(SLOTS)).reshape(-1).tolist()


def slot_masks(vocab: int) -> list[torch.Tensor]:
    """Per slot, the (vocab,) bool mask of the ids it may take: its 4096 audio ids; slot 0 (a frame
    boundary) also END_OF_SPEECH."""
    if vocab < AUDIO_END:
        raise ValueError(f"vocabulary {vocab} is smaller than Orpheus's audio tokens ({AUDIO_END})")
    masks = []
    for slot in range(SLOTS):
        allowed = torch.zeros(vocab, dtype=torch.bool)
        allowed[AUDIO_BASE + CODES * slot:AUDIO_BASE + CODES * (slot + 1)] = True
        if slot == 0:
            allowed[END_OF_SPEECH] = True
        masks.append(allowed)
    return masks


class OrpheusRule:
    """The decoding rule of an Orpheus answer: the k-th generated token must be an audio token of
    slot k mod 7, and END_OF_SPEECH may come only where a frame would start. Nothing is forced.
    State: the slot of the next token."""

    def __init__(self, masks: list[torch.Tensor]) -> None:
        self._constraints = [Constraint(allowed=m) for m in masks]

    def start(self) -> int:
        return 0

    def advance(self, state: int, token: int) -> int:
        return 0 if token == END_OF_SPEECH else (state + 1) % SLOTS

    def constraint(self, state: int) -> Constraint:
        return self._constraints[state]


def audio_tokens(generated: list[int]) -> list[int]:
    """Generated ids -> the audio tokens of whole frames (end of speech and a partial frame left)."""
    audio = [t for t in generated if AUDIO_BASE <= t < AUDIO_END]
    return audio[:len(audio) - len(audio) % SLOTS]


def check_checkpoint(path: Path) -> None:
    """ValueError, one line naming what is missing, unless `path` holds an Orpheus-layout Llama:
    config.json (vocabulary reaching the audio tokens), weights, and a tokenizer.json whose special
    tokens sit at Orpheus's ids."""
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory")
    if not (path / "config.json").exists():
        raise ValueError(f"{path} lacks config.json (a Hugging Face Llama checkpoint)")
    if not ((path / "model.safetensors").exists()
            or (path / "model.safetensors.index.json").exists()):
        raise ValueError(f"{path} lacks model.safetensors (or model.safetensors.index.json)")
    if not (path / "tokenizer.json").exists():
        raise ValueError(f"{path} lacks tokenizer.json (the checkpoint's Hugging Face tokenizer)")
    vocab = json.loads((path / "config.json").read_text()).get("vocab_size", 0)
    if vocab < AUDIO_END:
        raise ValueError(f"{path}: vocabulary {vocab} is not Orpheus's layout (audio tokens need "
                         f"{AUDIO_END} ids)")
    added = {t["id"]: t["content"]
             for t in json.loads((path / "tokenizer.json").read_text()).get("added_tokens", [])}
    wrong = [f"{name} at {tid}" for tid, name in SPECIAL_NAMES.items() if added.get(tid) != name]
    if wrong:
        raise ValueError(f"{path}/tokenizer.json is not Orpheus's layout: expected "
                         f"{', '.join(wrong)}")


def is_orpheus(path: Path) -> bool:
    try:
        check_checkpoint(path)
    except (ValueError, OSError, json.JSONDecodeError):
        return False
    return True
