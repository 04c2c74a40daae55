"""`spectts` command line. `spectts generate` runs the engine core on token ids."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from engine.sampling import SamplingParams
from engine.train_heads import add_parser as add_train_heads_parser, cmd_train_heads
from server.cli import add_serve_parser, cmd_serve
from engine.types import ACCEPTS, DECODINGS, DEFAULT_BETA, PHONEME_DURATIONS, GenerationConfig


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line, exit code 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def add_generation_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--decoding", default="plain", help="|".join(DECODINGS))
    p.add_argument("--accept", default="exact", help="|".join(ACCEPTS))
    p.add_argument("--tau", type=int, default=2,
                   help="tolerance: top-τ / τ samples (heads), the support of greedy draft")
    p.add_argument("--beta", type=float, default=DEFAULT_BETA, help="draft + tolerance: SSD's β")
    p.add_argument("--min-ratio", type=float, default=0.5,
                   help="greedy tolerance: a top-τ token needs this share of the top token's probability")
    p.add_argument("--gamma", type=int, default=4, help="draft: tokens drafted per round")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--repetition-window", type=int, default=64)
    p.add_argument("--seed", type=int, default=None)


_SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "repetition_penalty", "repetition_window")


def generation_config(args: argparse.Namespace, sampling: SamplingParams = SamplingParams()
                      ) -> GenerationConfig:
    """The flags' config; sampling flags left unset (None) keep `sampling`'s values."""
    given = {k: getattr(args, k) for k in _SAMPLING_FLAGS if getattr(args, k) is not None}
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens, decoding=args.decoding, accept=args.accept,
        tau=args.tau, beta=args.beta, gamma=args.gamma, seed=args.seed, min_ratio=args.min_ratio,
        sampling=replace(sampling, **given))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="spectts", description="SpecTTS: speculative-decoding TTS engine")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    gen = sub.add_parser("generate", help="generate token ids from prompt token ids")
    gen.add_argument("--bundle", required=True, help="bundle or Hugging Face Llama directory")
    gen.add_argument("--prompt-ids", type=_ids, required=True, help="e.g. 1,2,3")
    gen.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    gen.add_argument("--threads", type=int, default=None, help="torch and BLAS threads")
    gen.add_argument("--max-len", type=int, default=2048, help="KV cache length per sequence")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    add_generation_flags(gen)

    syn = sub.add_parser("synth", help="text to a WAV file with a voice bundle")
    syn.add_argument("text", nargs="?", help="the text to speak")
    syn.add_argument("-o", "--output", default="out.wav", help="WAV file (single text)")
    syn.add_argument("--text-file", help="one text per line; writes OUT_DIR/000.wav, 001.wav, …")
    syn.add_argument("--out-dir", default="synth_out")
    syn.add_argument("--bundle", default=None, help="voice bundle (default: the shipped voice), or "
                                                    "an Orpheus-family checkpoint (with --codec)")
    syn.add_argument("--codec", default=None, help="the checkpoint's codec directory (SNAC 24 kHz)")
    syn.add_argument("--draft", default=None, help="a smaller Llama with the checkpoint's "
                                                   "vocabulary (--decoding draft)")
    syn.add_argument("--heads", default=None, help="draft heads trained for the checkpoint "
                                                   "(spectts train-heads; --decoding heads)")
    syn.add_argument("--voice", default=None, help="the speaker (Orpheus: tara, leah, …; default: "
                                                   "the checkpoint's first)")
    syn.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    syn.add_argument("--threads", type=int, default=None, help="torch and BLAS threads")
    syn.add_argument("--json", action="store_true", help="print one JSON object per text")
    syn.add_argument("--phoneme-durations", choices=PHONEME_DURATIONS, default=None,
                     help="who ends each phoneme: the speech LM or espeak-ng (default: the voice's)")
    add_generation_flags(syn)
    # sampling flags left unset take the voice's defaults (`_voice_sampling`)
    syn.set_defaults(max_new_tokens=10**6, temperature=None, top_k=None, top_p=None,
                     repetition_penalty=None, repetition_window=None)
    add_serve_parser(sub)
    add_train_heads_parser(sub)

    ben = sub.add_parser("bench", help="run a benchmark: engine | load | voice (bench/*.py); "
                                       "arguments after the name go to it")
    ben.add_argument("name", choices=sorted(BENCHES))
    ben.add_argument("args", nargs=argparse.REMAINDER)
    return parser


BENCHES = {"engine": "bench.engine_bench", "load": "bench.load", "soak": "bench.soak",
           "voice": "bench.eval_voice"}


def cmd_bench(args: argparse.Namespace) -> int:
    import runpy

    sys.argv = [f"spectts bench {args.name}", *args.args]
    runpy.run_module(BENCHES[args.name], run_name="__main__")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from engine.engine import Engine
    from engine.threads import set_threads

    if args.threads:
        set_threads(args.threads)
    cfg = generation_config(args)
    engine = Engine.load(args.bundle, device=args.device, max_batch=1, max_len=args.max_len)
    result = engine.generate(args.prompt_ids, cfg)
    stats = result.stats.to_dict()
    if args.json:
        print(json.dumps({"tokens": result.tokens, "stats": stats,
                          "finish_reason": result.finish_reason}))
    else:
        print(" ".join(map(str, result.tokens)))
        print(f"{stats['tokens']} tokens, {stats['target_forwards']} target forwards, "
              f"mean accepted length {stats['mean_accepted_length']:.2f}, "
              f"{stats['gen_seconds']:.3f} s", file=sys.stderr)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    import soundfile
    from engine.orpheus_tts import load_tts
    from engine.threads import set_threads
    from engine.tts import DEFAULT_VOICE

    if args.threads:
        set_threads(args.threads)
    if (args.text is None) == (args.text_file is None):
        raise ValueError("give either a text or --text-file")
    texts = ([args.text] if args.text is not None
             else Path(args.text_file).read_text(encoding="utf-8").splitlines())
    tts = load_tts(args.bundle or DEFAULT_VOICE, args.codec, args.draft, args.heads,
                   device=args.device,
                   phoneme_durations=args.phoneme_durations)
    if args.voice is not None and args.voice not in tts.voices:
        raise ValueError(f"unknown voice {args.voice!r}; this voice has {', '.join(tts.voices)}")
    cfg = generation_config(args, tts.sampling_defaults)
    for text in texts:  # validate every line before speaking any
        tts.plan(text, voice=args.voice)
    for i, text in enumerate(texts):
        start = time.perf_counter()
        speech = tts.synthesize(text, cfg, voice=args.voice)
        seconds = time.perf_counter() - start
        path = Path(args.output) if args.text is not None else Path(args.out_dir) / f"{i:03d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(path, speech.audio, speech.sample_rate, subtype="PCM_16")
        if args.json:
            print(json.dumps({"text": text, "path": str(path), "tokens": speech.tokens,
                              "audio_seconds": speech.seconds, "stats": speech.stats.to_dict()}))
        else:
            print(f"{path}: {speech.seconds:.2f} s of audio in {seconds:.2f} s "
                  f"(mean accepted length {speech.stats.mean_accepted_length:.2f})", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"generate": cmd_generate, "synth": cmd_synth, "serve": cmd_serve,
                "bench": cmd_bench, "train-heads": cmd_train_heads}[args.command](args)
    except (ValueError, OSError) as exc:
        print(f"spectts {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
