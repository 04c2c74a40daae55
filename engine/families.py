"""Voice families: what the service, the server and the CLI need from a family's text-to-speech
object, in one place. Which family a checkpoint is: `models.voices.families`.

A family is the knowledge that turns text into an LM's prompt and its tokens into audio; the engine
never changes for one. Two exist:
- "bundle": SpecTTS's interleaved voices (`engine.tts.TextToSpeech`; a `spectts.json` bundle:
  espeak-ng phonemes forced between speech tokens, a streaming Vocos vocoder);
- "orpheus": Orpheus-family checkpoints (`engine.orpheus_tts.OrpheusTTS`; Llama-3.2 over SNAC
  24 kHz codes, `models.voices.orpheus`).
Another family (Llasa + XCodec2, OuteTTS + DAC) is one more class with the surface `VoiceFamily`
states, a check of its checkpoint, and an entry in `engine.orpheus_tts.load_tts` and
`models.voices.families.family_of`. A request's config is checked once, by the engine at admission
(`Engine.check_config`), whatever the family.
"""

from __future__ import annotations

from typing import Hashable, Protocol, Sequence

import numpy as np

from engine.decoding.engine import Engine
from engine.decoding.sampling import SamplingParams
from engine.types import GenerationConfig
from models.voices.rules import TokenRule


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

    def max_new_tokens(self, plan) -> int:
        """The plan's longest answer (its text's cap, within the cache after the prompt)."""

    def generation_config(self, plan, cfg: GenerationConfig) -> GenerationConfig:
        """`cfg` capped for this plan (`max_new_tokens`)."""

    def take_frames(self, tokens: list[int], scanned: int) -> tuple[list, int]:
        """The codec frames among generated tokens[scanned:], and how far they were read."""

    def stream_decoder(self) -> Hashable:
        """A streaming codec decoder for one utterance (push frames, flush at the end)."""

    def push_many(self, decoders: list, frames: list[list]) -> list[np.ndarray]:
        """Push each decoder its new frames, batched across streams; the audio now final. A push
        replaces a decoder's state and never changes it in place, so a shallow copy of a decoder
        is a snapshot (a failed pass is retried stream by stream from one:
        `engine.serving.vocoding`)."""

    def vocode(self, frames: list) -> np.ndarray:
        """One utterance's frames to audio at once (offline)."""

    def synthesize(self, text: str, cfg: GenerationConfig | None = None, speed: float = 1.0,
                   voice: str | None = None):
        """Offline synthesis (`engine.tts.Speech`), equal to what the streaming path sends."""
