"""Streaming vocoding's CPU cost per audio second, against offline decoding of whole sentences.

    .venv/bin/python -m bench.vocoder_stream [--bundle models/default_voice] [--streams 1,16]
        [--sentences 2] [--frames 150] [--frames-per-step 1.0] [--speed 2.0] [--repeats 5]
        [--threads 1] [--baseline main]

The voice's vocoder (CPU, `--threads` torch threads), token ids drawn at random (the cost does not
depend on them). Rows:
- offline: `CausalVocos(tokens)` over whole sentences, --offline-batch at once (and one at a time);
- streaming, N streams: the service's chunk pattern replayed through `push_many`. The pattern is
  simulated first, on a simulated clock: each stream speaks --sentences sentences of --frames
  frames; every engine step adds --frames-per-step frames to each stream, a step lasting what makes
  each stream decode --speed times faster than real time (the admission's capacity margin); the
  streams start one after the other over one sentence's decoding. A sentence's frames leave in
  chunks sized by `ChunkSizes.size` (the service's first_chunk_frames and chunk_frames), given the
  listener's buffer (`Playback`: it plays from the first chunk); every step's chunks go in ONE
  batched pass (the vocoder thread keeping up), and a sentence's last chunk is followed by its
  flush.
Each row is timed by this thread's CPU clock, --repeats times after a warm-up, the median reported
as CPU seconds per second of audio. `--baseline REF` replays the same pattern through the streaming
vocoder of git revision REF (its `models/vocoder.py`, or `models/streaming_vocoder.py` where it has
one), loaded beside this tree's, so one run compares before and after. The streamed audio is checked
against offline decoding (max abs difference). Prints a markdown table; writes JSON to
bench/results/vocoder_stream.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Push:
    """One stream's entry in a batched pass: its frames, then a flush if its sentence ended."""

    stream: int
    tokens: np.ndarray
    flush: bool


def chunk_pattern(sentences: list[list[np.ndarray]], sizes, frames_per_step: float, speed: float
                  ) -> list[list[Push]]:
    """The passes the service makes for these streams (each a list of sentences' token arrays):
    see the module docstring."""
    from engine.serving.deadlines import Playback

    step_s = frames_per_step * sizes.frame_s / speed
    n = len(sentences)
    per_sentence = len(sentences[0][0]) / frames_per_step  # steps
    starts = [i * per_sentence / n for i in range(n)]  # in steps
    state = [dict(sentence=0, made=0.0, sent=0, chunks=0, pending=0) for _ in range(n)]
    players = [Playback(created=0.0) for _ in range(n)]
    passes, step = [], 0
    while any(s["sentence"] < len(sentences[i]) for i, s in enumerate(state)):
        now, batch = step * step_s, []
        for i, s in enumerate(state):
            if step < starts[i] or s["sentence"] >= len(sentences[i]):
                continue
            tokens = sentences[i][s["sentence"]]
            s["made"] = min(len(tokens), s["made"] + frames_per_step)
            s["pending"] = int(s["made"]) - s["sent"]
            ended = int(s["made"]) == len(tokens)
            buffered = players[i].slack(now) if players[i].started else None
            if s["pending"] and (s["pending"] >= sizes.size(s["chunks"], buffered) or ended):
                batch.append(Push(i, tokens[s["sent"]:s["sent"] + s["pending"]], ended))
                s["sent"] += s["pending"]
                s["chunks"] += 1
                players[i].sent(s["pending"] * sizes.frame_s, now)  # lookahead aside
            if ended:
                s.update(sentence=s["sentence"] + 1, made=0.0, sent=0, chunks=0, pending=0)
        if batch:
            passes.append(batch)
        step += 1
    return passes


def replay(passes: list[list[Push]], streams: int, decoder, push_many) -> list[list[np.ndarray]]:
    """Vocode the pattern with fresh decoders; returns each stream's audio pieces."""
    decoders = [decoder() for _ in range(streams)]
    audio = [[] for _ in range(streams)]
    for batch in passes:
        outs = push_many([decoders[p.stream] for p in batch], [p.tokens for p in batch])
        for p, out in zip(batch, outs):
            audio[p.stream].append(out)
            if p.flush:
                audio[p.stream].append(decoders[p.stream].flush())
    return audio


def cpu_seconds(run, repeats: int) -> float:
    run()  # warm-up: allocations, caches, the prepared weights
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        run()
        times.append(time.thread_time() - start)
    return statistics.median(times)


def load_baseline(ref: str, vocoder_dir: Path):
    """(decoder factory, push_many) of git revision `ref`'s streaming vocoder over the same weights."""
    def source(path: str) -> str | None:
        done = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:{path}"], capture_output=True,
                              text=True)
        return done.stdout if done.returncode == 0 else None

    def module(name: str, text: str):
        path = Path(tempfile.mkdtemp()) / f"{name}.py"
        path.write_text(text)
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod

    text = source("models/vocoder.py")
    if text is None:
        raise SystemExit(f"--baseline {ref}: no models/vocoder.py there (git show failed)")
    old = module("baseline_vocoder", text)
    model = old.CausalVocos.load(vocoder_dir)
    if not hasattr(old, "push_many"):  # the streaming vocoder in its own module
        old = module("baseline_streaming_vocoder", source("models/streaming_vocoder.py"))
        from models.vocoder import CausalVocos

        model = CausalVocos.load(vocoder_dir)
    return (lambda: old.StreamingVocoder(model)), old.push_many


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="models/default_voice")
    ap.add_argument("--streams", default="1,16", help="concurrent streams, e.g. 1,16")
    ap.add_argument("--sentences", type=int, default=2, help="sentences per stream")
    ap.add_argument("--frames", type=int, default=150, help="frames per sentence (150: 3 s)")
    ap.add_argument("--offline-batch", type=int, default=16)
    ap.add_argument("--frames-per-step", type=float, default=1.0,
                    help="frames each stream gains per engine step")
    ap.add_argument("--speed", type=float, default=2.0, help="each stream's decoding speed, x real time")
    ap.add_argument("--first-chunk-frames", type=int, default=4)
    ap.add_argument("--chunk-frames", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--baseline", default="main", help="git revision to compare with ('' : none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/vocoder_stream.json")
    args = ap.parse_args()

    from engine.serving.chunker import ChunkSizes
    from models.streaming_vocoder import StreamingVocoder, push_many
    from models.voices.bundle import BUNDLE_FILE
    from models.vocoder import CausalVocos

    torch.set_num_threads(args.threads)
    raw = json.loads((Path(args.bundle) / BUNDLE_FILE).read_text())
    vocoder_dir = Path(args.bundle) / raw["vocoder"]
    model = CausalVocos.load(vocoder_dir)
    cfg = model.cfg
    sizes = ChunkSizes.for_voice(args.first_chunk_frames, args.chunk_frames, cfg.hop,
                                 cfg.sample_rate, cfg.overlap_samples)
    impls = {"this tree": (lambda: StreamingVocoder(model), push_many)}
    if args.baseline:
        impls = {f"baseline {args.baseline}": load_baseline(args.baseline, vocoder_dir), **impls}
    rng = np.random.default_rng(args.seed)
    frame_s = cfg.hop / cfg.sample_rate
    rows = []

    batch = rng.integers(0, cfg.num_tokens, (args.offline_batch, args.frames))
    audio_s = batch.size * frame_s
    with torch.inference_mode():
        for b in sorted({1, args.offline_batch}):
            def offline():
                for i in range(0, len(batch), b):
                    model(torch.from_numpy(batch[i:i + b]))
            rows.append({"case": f"offline, whole sentences, batch {b}", "audio_seconds": audio_s,
                         "cpu_s_per_audio_s": {"offline": cpu_seconds(offline, args.repeats)
                                               / audio_s}})
    offline_ref = rows[-1]["cpu_s_per_audio_s"]["offline"]

    for n in (int(x) for x in args.streams.split(",")):
        sentences = [[rng.integers(0, cfg.num_tokens, args.frames) for _ in range(args.sentences)]
                     for _ in range(n)]
        passes = chunk_pattern(sentences, sizes, args.frames_per_step, args.speed)
        audio_s = n * args.sentences * args.frames * frame_s
        with torch.inference_mode():
            want = [model(torch.from_numpy(np.stack(s))) for s in sentences]  # (sentences, T * hop)
        row = {"case": f"streaming, {n} stream(s)", "audio_seconds": audio_s, "passes": len(passes),
               "streams_per_pass": sum(map(len, passes)) / len(passes),
               "frames_per_chunk": sum(len(p.tokens) for b in passes for p in b)
               / sum(map(len, passes)), "cpu_s_per_audio_s": {}, "max_abs_diff": {}}
        for name, (decoder, push) in impls.items():
            got = replay(passes, n, decoder, push)
            row["max_abs_diff"][name] = max(
                float(np.abs(np.concatenate(a) - w.reshape(-1).numpy()).max())
                for a, w in zip(got, want))
            row["cpu_s_per_audio_s"][name] = cpu_seconds(
                lambda: replay(passes, n, decoder, push), args.repeats) / audio_s
        rows.append(row)

    names = list(impls)
    print(f"\nvocoder {vocoder_dir}, {args.threads} torch thread(s), CPU s per audio s (median of "
          f"{args.repeats}); chunks {sizes.first_chunk_frames}..{sizes.chunk_frames} frames, "
          f"{args.frames_per_step} frames per step, streams at {args.speed}x real time\n")
    head = " | ".join(f"{n}: CPU s / audio s" for n in names)
    print(f"| case | passes | streams / pass | frames / chunk | {head} | "
          + (f"{names[0]} / {names[-1]} | " if len(names) > 1 else "")
          + f"{names[-1]} / offline (batch {args.offline_batch}) | max diff vs offline |")
    print("|" + "---|" * (6 + len(names) + (len(names) > 1)))
    for row in rows:
        cost = row["cpu_s_per_audio_s"]
        if "offline" in cost:  # the same code in every tree
            print(f"| {row['case']} | | | | " + " | ".join([f"{cost['offline']:.4f}"] * len(names))
                  + " |" + (" |" if len(names) > 1 else "")
                  + f" {cost['offline'] / offline_ref:.2f} | |")
            continue
        cells = " | ".join(f"{cost[n]:.4f}" for n in names)
        ratio = f" {cost[names[0]] / cost[names[-1]]:.2f}x |" if len(names) > 1 else ""
        diff = max(row["max_abs_diff"].values())
        print(f"| {row['case']} | {row['passes']} | {row['streams_per_pass']:.2f} | "
              f"{row['frames_per_chunk']:.1f} | {cells} |{ratio} "
              f"{cost[names[-1]] / offline_ref:.2f} | {diff:.1e} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "torch_threads": args.threads, "device": "cpu",
                               "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
