"""Text to speech with a voice bundle: frontend -> interleaved speech LM (the engine) -> vocoder.

Text is split into sentences; each sentence is phonemised by the bundle's frontend (Festival or
espeak-ng, `models.voices.phonemizer`), decoded by the engine under the interleaved rule (phonemes
forced; the model decides the speech frames, and where each phoneme ends unless the frontend's
durations are forced: `phoneme_durations="frontend"`), and its speech tokens are vocoded. Sentences
are independent, so long text streams sentence by sentence.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.decoding.engine import Engine, resolve_device
from engine.decoding.sampling import SamplingParams
from engine.types import GenerationConfig, GenerationStats
from models.voices import interleaved
from models.voices.bundle import DEFAULT_VOICE, PHONEME_DURATIONS, bundle_name, load_bundle
from models.voices.phonemizer import make_phonemizer


@dataclass
class SentencePlan:
    text: str
    prompt: list[int]
    phonemes: list[int]  # phoneme-vocabulary ids
    durations: list[int] | None = None  # frames per phoneme, forced; None: the model decides


@dataclass
class Speech:
    audio: np.ndarray  # float32 mono
    sample_rate: int
    tokens: list[int]  # speech token ids (codebook ids), all sentences
    stats: GenerationStats = field(default_factory=GenerationStats)

    @property
    def seconds(self) -> float:
        return len(self.audio) / self.sample_rate


def decode_plans(tts, plans: list, cfg: GenerationConfig):
    """Each plan's GenerationResult, in order: the sentences run as one batch, max_batch at a time,
    under the voice's rule and caps (`tts`: TextToSpeech or a family's counterpart)."""
    step = tts.engine.cache.max_batch
    for i in range(0, len(plans), step):
        group = plans[i:i + step]
        yield from tts.engine.generate_batch(
            [p.prompt for p in group], [tts.generation_config(p, cfg) for p in group],
            [tts.rule(p) for p in group])


def generate_answers(tts, texts: list[str], voices: list[str], cfg: GenerationConfig
                     ) -> list[tuple[list[int], list[int], object]]:
    """(prompt, answer, rule) of every sentence of every text, the voices in turn: a checkpoint's
    own generations, what `models.recipes.train_heads` trains draft heads on."""
    plans = [p for i, text in enumerate(texts)
             for p in tts.plan(text, voice=voices[i % len(voices)])]
    results = decode_plans(tts, plans, cfg)
    return [(p.prompt, r.tokens, tts.rule(p)) for p, r in zip(plans, results)]


def stretch(tokens: list[int], speed: float, done: int) -> tuple[list[int], int]:
    """Time-scale a frame stream by `speed` (2.0 = twice as fast) without changing pitch: output frame j
    shows input frame floor(j * speed). `done` counts output frames already produced; returns the new
    output frames available from `tokens` (all input frames so far) and the new count."""
    if speed == 1.0:
        return tokens[done:], len(tokens)
    out = []
    while int(done * speed) < len(tokens):
        out.append(tokens[int(done * speed)])
        done += 1
    return out, done


class TextToSpeech:
    def __init__(self, bundle_path: str | Path = DEFAULT_VOICE, device: str = "cpu",
                 max_batch: int = 8, max_len: int = 4096, prefix_blocks: int = 0,
                 phoneme_coverage: float | None = None, phoneme_durations: str | None = None,
                 runner: str = "auto") -> None:
        """phoneme_coverage: restrict each phoneme's speech tokens to those covering this share of its
        training frames (None: the bundle's setting; >= 1: no restriction).
        phoneme_durations: who decides where each phoneme ends: "model" (the LM's end-of-phoneme
        marker) or "frontend" (espeak-ng's durations, the training alignment, forced); None: the
        bundle's setting, else "model".
        runner: how the networks' forwards run (`models.runners`), chosen once here."""
        from models.vocoder import CausalVocos
        from models.voices.frontend import PhonemeVocab

        dev = resolve_device(device)
        bundle = load_bundle(bundle_path, dev)
        if bundle.tokens is None or "vocoder" not in bundle.raw or "frontend" not in bundle.raw:
            raise ValueError(f"{bundle_path} is not a voice bundle (tokens, vocoder, frontend)")
        self.engine = Engine(bundle, max_batch=max_batch, max_len=max_len,
                             prefix_blocks=prefix_blocks, runner=runner)
        self.layout = bundle.tokens
        front = bundle.raw["frontend"]
        self.phoneme_vocab = PhonemeVocab.load(Path(bundle_path) / front["phonemes"])
        self.vocoder = CausalVocos.load(Path(bundle_path) / bundle.raw["vocoder"], dev)
        self.sample_rate = self.vocoder.cfg.sample_rate
        self.max_frames = int(bundle.raw.get("max_frames_per_phoneme", 0))
        self.phoneme_durations = phoneme_durations or bundle.raw.get("phoneme_durations", "model")
        if self.phoneme_durations not in PHONEME_DURATIONS:
            raise ValueError(f"phoneme_durations must be one of {PHONEME_DURATIONS}, "
                             f"not {self.phoneme_durations!r}")
        self.hop = self.vocoder.cfg.hop  # the frontend's frames are the vocoder's
        self.phonemizer = make_phonemizer(front, self.hop, self.sample_rate,
                                          forced=self.phoneme_durations == "frontend")
        self.name = bundle_name(bundle_path)
        self.voices = (self.name,)  # one speaker
        self.default_voice = self.name
        self.sampling_defaults = SamplingParams()  # greedy
        self.phoneme_masks = None  # per phoneme id, its allowed (V,) mask; None: unconstrained
        entry = bundle.raw.get("phoneme_tokens")
        coverage = float(phoneme_coverage if phoneme_coverage is not None
                         else (entry or {}).get("coverage", 1.0))
        if entry and coverage < 1.0:
            self.phoneme_masks = interleaved.phoneme_allowed_masks(
                self.layout, interleaved.load_phoneme_counts(Path(bundle_path), entry), coverage,
                self.engine.vocab_size)

    # --- text -> prompts -----------------------------------------------------------------------
    def plan(self, text: str, max_chars: int = 300, voice: str | None = None
             ) -> list[SentencePlan]:
        """Split and phonemise; ValueError when nothing speakable is left. `voice`: the bundle has
        one (callers map names to it)."""
        from models.voices.frontend import split_sentences

        if not text or not text.strip():
            raise ValueError("the input text is empty")
        plans = []
        for sentence in split_sentences(text, max_chars=max_chars):
            phones = self.phonemizer.phonemize(sentence)
            if phones.speakable(self.phonemizer.pauses):
                ids = self.phoneme_vocab.to_ids(phones.names)
                plans.append(SentencePlan(sentence, interleaved.prompt_ids(self.layout, ids), ids,
                                          phones.frames))
        if not plans:
            raise ValueError("the input text has nothing speakable after normalisation")
        return plans

    def rule(self, plan: SentencePlan):
        return interleaved.rule(self.layout, plan.phonemes, self.engine.vocab_size, self.max_frames,
                                self.phoneme_masks, plan.durations)

    def max_new_tokens(self, plan: SentencePlan) -> int:
        """A hard cap: phonemes, markers and their frames (up to max_frames, or 50, each when the
        model decides), and the end."""
        frames = (sum(plan.durations) if plan.durations is not None
                  else len(plan.phonemes) * (self.max_frames or 50))
        return 2 * len(plan.phonemes) + frames + 2

    def generation_config(self, plan: SentencePlan, cfg: GenerationConfig) -> GenerationConfig:
        from dataclasses import replace
        return replace(cfg, max_new_tokens=min(cfg.max_new_tokens, self.max_new_tokens(plan)),
                       stop_on_eos=True)

    # --- the streaming service's hooks (engine.serving): frames are speech tokens ----------------
    def take_frames(self, tokens: list[int], scanned: int) -> tuple[list[int], int]:
        """The speech tokens among tokens[scanned:], and how far they were read (all of them)."""
        return interleaved.speech_tokens(self.layout, tokens[scanned:]), len(tokens)

    def stream_decoder(self):
        from models.streaming_vocoder import StreamingVocoder

        return StreamingVocoder(self.vocoder)

    @staticmethod
    def push_many(decoders: list, frames: list) -> list[np.ndarray]:
        from models.streaming_vocoder import push_many

        return push_many(decoders, frames)

    @property
    def lookahead_samples(self) -> int:
        return self.vocoder.cfg.overlap_samples

    # --- offline synthesis ----------------------------------------------------------------------
    def synthesize(self, text: str, cfg: GenerationConfig = GenerationConfig(max_new_tokens=10**6),
                   speed: float = 1.0, voice: str | None = None) -> Speech:
        start = time.perf_counter()
        total = GenerationStats()
        tokens: list[list[int]] = []  # per sentence
        for r in decode_plans(self, self.plan(text), cfg):
            total.merge(r.stats)
            frames = interleaved.speech_tokens(self.layout, r.tokens)
            tokens.append(stretch(frames, speed, 0)[0])
        # each sentence is vocoded on its own, as the streaming path does
        audio = np.concatenate([self.vocode(t) for t in tokens])
        total.gen_seconds = time.perf_counter() - start  # wall time, frontend and vocoder included
        return Speech(audio=audio, sample_rate=self.sample_rate, tokens=[t for s in tokens for t in s],
                      stats=total)

    @torch.inference_mode()
    def vocode(self, tokens: list[int]) -> np.ndarray:
        if not tokens:
            return np.zeros(0, dtype=np.float32)
        ids = torch.tensor([tokens], dtype=torch.long, device=next(self.vocoder.parameters()).device)
        return self.vocoder(ids)[0].float().cpu().numpy().clip(-1, 1)
