"""`spectts` command line. `spectts generate` runs the engine core on token ids."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from engine.decoding.sampling import SamplingParams
from engine.types import ACCEPTS, DECODINGS, GenerationConfig, default_of, help_of
from models.voices.bundle import PHONEME_DURATIONS
from server.model_registry import add_model_flags, chosen_model
from server.serve import add_serve_parser, cmd_serve


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line, exit code 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


# generation flags: name -> the dataclass whose field gives its default and help
_GENERATION_FLAGS = {"max_new_tokens": GenerationConfig, "decoding": GenerationConfig,
                     "accept": GenerationConfig, "tau": GenerationConfig, "beta": GenerationConfig,
                     "min_ratio": GenerationConfig, "gamma": GenerationConfig,
                     "temperature": SamplingParams, "top_k": SamplingParams,
                     "top_p": SamplingParams, "repetition_penalty": SamplingParams,
                     "repetition_window": SamplingParams, "seed": GenerationConfig}
_CHOICES = {"decoding": DECODINGS, "accept": ACCEPTS}
_SAMPLING_FLAGS = [name for name, cls in _GENERATION_FLAGS.items() if cls is SamplingParams]


def add_generation_flags(p: argparse.ArgumentParser, voice_sampling: bool = False,
                         **defaults) -> None:
    """--max-new-tokens, --decoding, ... with the engine's defaults and help (`GenerationConfig`,
    `SamplingParams`): one source, so a flag's default cannot drift from the engine's. `defaults`:
    a command's own defaults for some of them. voice_sampling: the sampling flags default to the
    voice's sampling (`generation_config`'s `sampling`), not the engine's."""
    for name, cls in _GENERATION_FLAGS.items():
        default = defaults.get(name, default_of(cls, name))
        kind = int if name == "seed" else type(default_of(cls, name))
        shown = default
        if voice_sampling and name in _SAMPLING_FLAGS:
            default, shown = None, "the voice's"
        # choices shown, checked by GenerationConfig.validate (one place, one message)
        kwargs = {"metavar": "{" + ",".join(_CHOICES[name]) + "}"} if name in _CHOICES else {"type": kind}
        p.add_argument(f"--{name.replace('_', '-')}", default=default,
                       help=f"{help_of(cls, name)} (default: {shown})", **kwargs)


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

    syn = sub.add_parser("synth", help="text to a WAV file with a voice bundle or an Orpheus-family "
                                       "checkpoint")
    syn.add_argument("text", nargs="?", help="the text to speak")
    syn.add_argument("-o", "--output", default="out.wav", help="WAV file (single text)")
    syn.add_argument("--text-file", help="one text per line; writes OUT_DIR/000.wav, 001.wav, …")
    syn.add_argument("--out-dir", default="synth_out")
    syn.add_argument("--bundle", default=None, help="voice bundle (default: the shipped voice), or "
                                                    "an Orpheus-family checkpoint (with --codec): "
                                                    "model tts-1 when --models is not given")
    add_model_flags(syn)
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
    # each sentence is capped by its text; sampling defaults to the voice's (Orpheus samples)
    add_generation_flags(syn, voice_sampling=True, max_new_tokens=10**6)
    add_serve_parser(sub)
    add_train_heads_parser(sub)

    ben = sub.add_parser("bench", help="run a benchmark: " + " | ".join(BENCHES) + " (bench/*.py); "
                                       "arguments after the name go to it")
    ben.add_argument("name", choices=sorted(BENCHES))
    ben.add_argument("args", nargs=argparse.REMAINDER)
    return parser


BENCHES = {"engine": "bench.engine_bench", "load": "bench.load", "soak": "bench.soak",
           "voice": "bench.eval_voice", "profile-load": "bench.profile_load",
           "vocoder-stream": "bench.vocoder_stream"}


def cmd_bench(args: argparse.Namespace) -> int:
    import runpy

    sys.argv = [f"spectts bench {args.name}", *args.args]
    runpy.run_module(BENCHES[args.name], run_name="__main__")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from engine.decoding.engine import Engine
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
    from models.voices.bundle import DEFAULT_VOICE

    if args.threads:
        set_threads(args.threads)
    if (args.text is None) == (args.text_file is None):
        raise ValueError("give either a text or --text-file")
    texts = ([args.text] if args.text is not None
             else Path(args.text_file).read_text(encoding="utf-8").splitlines())
    if args.models and args.bundle:
        raise ValueError("give --models or --bundle, not both")
    spec = chosen_model(args, args.bundle or DEFAULT_VOICE, args.codec, args.draft, args.heads)
    tts = load_tts(spec.bundle, spec.codec, spec.draft, spec.heads,
                   device=args.device, phoneme_durations=args.phoneme_durations)
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


def add_train_heads_parser(subparsers) -> argparse.ArgumentParser:
    from models.recipes import train_heads

    p = subparsers.add_parser("train-heads", help="train draft heads for a checkpoint from its own "
                                                  "generations (MEDUSA-2 self-distillation)",
                              description=train_heads.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, help="the checkpoint (or a voice bundle)")
    p.add_argument("--codec", default=None, help="its codec directory (Orpheus: SNAC 24 kHz)")
    p.add_argument("--texts", required=True, help="a text file, one text per line")
    p.add_argument("--out", required=True, help="the heads directory to write")
    p.add_argument("--voices", default=None, help="comma-separated speakers taken in turn "
                                                  "(default: all of the checkpoint's)")
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-rows", type=int, default=256, help="positions per head per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--loss", choices=("kl", "ce"), default="kl",
                   help="kl: to the target's distributions; ce: on its generated tokens")
    p.add_argument("--temperature", type=float, default=None,
                   help="generation temperature (default: the family's sampling)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="cap per sentence (default: the family's)")
    p.add_argument("--valid-share", type=float, default=0.1, help="answers held out to measure")
    p.add_argument("--tree-nodes", type=int, default=64, help="candidates in the serving tree")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-batch", type=int, default=8, help="sentences generated together")
    p.add_argument("--max-len", type=int, default=4096, help="KV cache length per sequence")
    p.add_argument("--seed", type=int, default=0)
    return p


def cmd_train_heads(args: argparse.Namespace) -> int:
    """The checkpoint speaks --texts (the engine), then `models.recipes.train_heads` trains and
    writes the heads."""
    import time
    from dataclasses import asdict
    from pathlib import Path

    from engine.orpheus_tts import load_tts
    from engine.threads import set_threads
    from engine.tts import generate_answers
    from models.recipes.train_heads import train_heads

    def log(message: str) -> None:
        print(f"train-heads: {message}", file=sys.stderr, flush=True)

    if args.threads:
        set_threads(args.threads)
    texts = [t for t in Path(args.texts).read_text(encoding="utf-8").splitlines() if t.strip()]
    if not texts:
        raise ValueError(f"{args.texts} has no text")
    if args.num_heads < 1 or args.steps < 1:
        raise ValueError("--num-heads and --steps must be >= 1")
    tts = load_tts(args.bundle, args.codec, device=args.device, max_batch=args.max_batch,
                   max_len=args.max_len)
    voices = args.voices.split(",") if args.voices else list(tts.voices)
    unknown = [v for v in voices if v not in tts.voices]
    if unknown:
        raise ValueError(f"unknown voices {unknown}; this checkpoint has {', '.join(tts.voices)}")
    sampling = tts.sampling_defaults
    if args.temperature is not None:
        sampling = replace(sampling, temperature=args.temperature)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens or 10**6, sampling=sampling,
                           seed=args.seed)
    start = time.perf_counter()
    sequences = generate_answers(tts, texts, voices, cfg)
    log(f"generated {sum(len(a) for _, a, _ in sequences)} tokens for {len(sequences)} sentences "
        f"in {time.perf_counter() - start:.1f} s")
    metrics = train_heads(tts.engine.target, sequences, args.out, args.num_heads, args.steps,
                          args.batch_rows, args.lr, args.loss, args.valid_share, args.tree_nodes,
                          args.seed, log, about={"sampling": asdict(sampling)})
    log(f"wrote {args.out} (top-1 accuracy by head {metrics['top1']})")
    print(json.dumps({"out": str(args.out), **metrics}))
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
