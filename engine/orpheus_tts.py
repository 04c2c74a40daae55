"""Text to speech with an Orpheus-family checkpoint: tokenizer -> prompt -> the engine under the
Orpheus rule -> SNAC frames -> audio.

`OrpheusTTS` offers what `engine.tts.TextToSpeech` offers (plan, rule, generation_config,
synthesize, and the streaming hooks `take_frames`, `stream_decoder`, `push_many`, `hop`,
`lookahead_samples` that `engine.serving.service.TTSService` uses), so the service, the server and
the CLI run it unchanged. The
family's knowledge (prompt, token layout, rule, defaults) lives in `models.voices.orpheus`; the codec
in `models.snac_codec`. A *frame* here is one SNAC frame: 7 LM tokens, 2048 samples at 24 kHz.

`load_tts` picks the class by the checkpoint's family (`models.voices.families`): Orpheus with a
`codec` directory, else a bundle.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from engine.decoding.engine import Engine, resolve_device
from engine.decoding.sampling import SamplingParams
from engine.tts import Speech, decode_plans, stretch
from engine.types import GenerationConfig, GenerationStats
from models.llama import LlamaForCausalLM
from models.voices import orpheus
from models.voices.bundle import load_bundle


@dataclass
class OrpheusPlan:
    text: str
    prompt: list[int]
    voice: str


class OrpheusTTS:
    def __init__(self, bundle_path: str | Path, codec_path: str | Path, device: str = "cpu",
                 max_batch: int = 8, max_len: int = 4096, prefix_blocks: int = 0,
                 draft_path: str | Path | None = None, lookahead_latents: int | None = None,
                 heads_path: str | Path | None = None, runner: str = "auto") -> None:
        """bundle_path: the checkpoint (config.json, safetensors, tokenizer.json, and optionally
        spectts-family.json naming its voices); codec_path: a SNAC directory; draft_path: a smaller
        Llama with the same vocabulary (decoding "draft"); heads_path: draft heads trained for this
        checkpoint (`spectts train-heads`; decoding "heads"); runner: how the networks' forwards
        run (`models.runners`), chosen once here. Weights run in their stored bf16 / fp16 on CUDA,
        float32 on the CPU. ValueError naming what is missing or wrong."""
        from tokenizers import Tokenizer

        from models.snac_codec import SnacCodec
        from models.voices.families import read_profile
        from models.voices.heads_files import load_heads

        bundle_path = Path(bundle_path)
        orpheus.check_checkpoint(bundle_path)
        profile = read_profile(bundle_path)
        if profile is not None and profile.family != "orpheus":
            raise ValueError(f"{bundle_path}: its profile names the family {profile.family!r}, "
                             f"not 'orpheus'")
        dev = resolve_device(device)
        bundle = load_bundle(bundle_path, dev)
        dtype = bundle.target.lm_head.weight.dtype
        if heads_path is not None:
            bundle.heads, bundle.heads_spec = load_heads(heads_path, bundle.target)
        if draft_path is not None:
            draft = LlamaForCausalLM.from_pretrained(_hf_dir(Path(draft_path), "draft"), dev,
                                                     dtype)
            if draft.config.vocab_size != bundle.target.config.vocab_size:
                raise ValueError(f"the draft model's vocabulary ({draft.config.vocab_size}) differs "
                                 f"from the checkpoint's ({bundle.target.config.vocab_size})")
            bundle.draft = draft
        self.engine = Engine(bundle, max_batch=max_batch, max_len=max_len,
                             prefix_blocks=prefix_blocks, runner=runner,
                             stop_tokens=(orpheus.END_OF_SPEECH,))
        self.tokenizer = Tokenizer.from_file(str(bundle_path / "tokenizer.json"))
        self.codec = SnacCodec.load(codec_path, dev, lookahead_latents=lookahead_latents)
        if (self.codec.codes_per_frame, self.codec.codebook_size) != (orpheus.SLOTS, orpheus.CODES):
            raise ValueError(f"codec {codec_path}: {self.codec.codes_per_frame} codes per frame of "
                             f"{self.codec.codebook_size}; Orpheus needs SNAC 24 kHz (7 of 4096)")
        self.sample_rate = self.codec.sample_rate
        self.hop = self.codec.samples_per_frame  # samples per frame
        self.lookahead_samples = self.codec.lookahead_samples
        self.name = bundle_path.name
        self.voices = (profile and profile.voices) or orpheus.VOICES
        self.default_voice = self.voices[0]
        self.sampling_defaults = SamplingParams(**orpheus.SAMPLING)
        self._rule = orpheus.OrpheusRule(orpheus.slot_masks(self.engine.vocab_size))

    # --- text -> prompts -----------------------------------------------------------------------
    def plan(self, text: str, max_chars: int = 300, voice: str | None = None) -> list[OrpheusPlan]:
        """One prompt per sentence; ValueError for empty text or an unknown voice."""
        from models.voices.frontend import split_sentences

        voice = voice or self.default_voice
        if voice not in self.voices:
            raise ValueError(f"unknown voice {voice!r}; this checkpoint has {', '.join(self.voices)}")
        if not text or not text.strip():
            raise ValueError("the input text is empty")
        plans = []
        for sentence in split_sentences(re.sub(r"\s+", " ", text).strip(), max_chars=max_chars):
            ids = self.tokenizer.encode(orpheus.prompt_text(voice, sentence)).ids
            plans.append(OrpheusPlan(sentence, orpheus.prompt_ids(ids), voice))
        if not plans:
            raise ValueError("the input text has nothing speakable")
        return plans

    def rule(self, plan: OrpheusPlan) -> orpheus.OrpheusRule:
        return self._rule  # stateless: the engine keeps each sequence's state

    def max_new_tokens(self, plan: OrpheusPlan) -> int:
        """The text's cap (`orpheus.max_new_tokens`), within what the cache holds after the prompt."""
        room = self.engine.max_len - len(plan.prompt) - 1
        fits = room - room % orpheus.SLOTS + 1 if room > orpheus.SLOTS else 1
        return min(orpheus.max_new_tokens(plan.text, self.hop / self.sample_rate), fits)

    def generation_config(self, plan: OrpheusPlan, cfg: GenerationConfig) -> GenerationConfig:
        return replace(cfg, max_new_tokens=min(cfg.max_new_tokens, self.max_new_tokens(plan)),
                       stop_on_eos=True)

    # --- tokens -> frames -> audio ----------------------------------------------------------------
    @staticmethod
    def take_frames(tokens: list[int], scanned: int) -> tuple[list[np.ndarray], int]:
        """The whole frames among tokens[scanned:] (generated: audio tokens, then maybe the end of
        speech), each a (7,) array of codes in the codec's order, and how far they were read."""
        audio = orpheus.audio_tokens(tokens[scanned:])
        return list(orpheus.codes_from_tokens(audio)), scanned + len(audio)

    def stream_decoder(self):
        return self.codec.stream()

    @staticmethod
    def push_many(decoders: list, frames: list[list[np.ndarray]]) -> list[np.ndarray]:
        from models.snac_codec import push_many

        return push_many(decoders, [np.asarray(f, dtype=np.int64).reshape(-1, orpheus.SLOTS)
                                    for f in frames])

    def vocode(self, frames: list[np.ndarray]) -> np.ndarray:
        return self.codec.decode(np.asarray(frames, dtype=np.int64).reshape(-1, orpheus.SLOTS))

    # --- offline synthesis ----------------------------------------------------------------------
    def default_config(self) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=10**6, sampling=self.sampling_defaults)

    def synthesize(self, text: str, cfg: GenerationConfig | None = None, speed: float = 1.0,
                   voice: str | None = None) -> Speech:
        """Every sentence decoded (max_batch at a time) and decoded to audio on its own, as the
        streaming path does. Speech.tokens: the audio token ids of every sentence."""
        cfg = cfg or self.default_config()
        start = time.perf_counter()
        total, tokens, audio = GenerationStats(), [], []
        for r in decode_plans(self, self.plan(text, voice=voice), cfg):
            total.merge(r.stats)
            frames, _ = self.take_frames(r.tokens, 0)
            tokens += orpheus.audio_tokens(r.tokens)
            audio.append(self.vocode(stretch(frames, speed, 0)[0]))
        total.gen_seconds = time.perf_counter() - start
        return Speech(audio=np.concatenate(audio).clip(-1, 1), sample_rate=self.sample_rate,
                      tokens=tokens, stats=total)


def _hf_dir(path: Path, what: str) -> Path:
    if not (path / "config.json").exists():
        raise ValueError(f"the {what} directory {path} lacks config.json")
    return path


def preflight(bundle_path: str | Path, codec_path: str | Path | None,
              draft_path: str | Path | None = None, heads_path: str | Path | None = None) -> None:
    """The checks `load_tts` starts with, without loading weights: a server refuses to start with
    one clear line (ValueError) instead of failing in its background load."""
    from models.snac_codec import SnacCodec
    from models.voices.families import read_profile
    from models.voices.heads_files import check_dir

    if Path(bundle_path).is_dir():
        read_profile(bundle_path)
    if heads_path is not None:
        check_dir(heads_path)
    if codec_path is None:
        return
    orpheus.check_checkpoint(Path(bundle_path))
    SnacCodec.check_dir(codec_path)
    if draft_path is not None:
        _hf_dir(Path(draft_path), "draft")


def load_tts(bundle_path: str | Path, codec_path: str | Path | None = None,
             draft_path: str | Path | None = None, heads_path: str | Path | None = None,
             **kwargs):
    """An `OrpheusTTS` when a codec is given (the checkpoint must have Orpheus's layout), else a
    `TextToSpeech` of a voice bundle (`models.voices.families`). kwargs: the constructors' shared
    options (device, max_batch, max_len, prefix_blocks, runner) and TextToSpeech's own
    (phoneme_coverage, phoneme_durations)."""
    from models.voices.families import family_of

    if codec_path is not None:
        for own in ("phoneme_coverage", "phoneme_durations"):
            kwargs.pop(own, None)  # interleaved voices' settings: nothing to do here
        return OrpheusTTS(bundle_path, codec_path, draft_path=draft_path, heads_path=heads_path,
                          **kwargs)
    if Path(bundle_path).is_dir() and family_of(bundle_path) == "orpheus":
        raise ValueError(f"{bundle_path} is an Orpheus checkpoint: give its SNAC 24 kHz codec "
                         f"directory with --codec")
    for flag, given in (("--draft", draft_path), ("--heads", heads_path)):
        if given is not None:
            raise ValueError(f"{flag} is for checkpoints served with --codec; a voice bundle names "
                             f"its draft model and heads in spectts.json")
    from engine.tts import TextToSpeech

    return TextToSpeech(bundle_path, **kwargs)
