"""The offline pipeline's capacity: what this machine computes without serving, for `bench.load`.

The same sentences, voice, torch threads and decoding as the served run, but no server, no event loop
and no deadlines: the engine decodes them `batch` at a time to the end (`Engine.generate_batch`,
with the server's prefill chunk and row budget), then the vocoder renders each batch's audio in one
batched pass (the voice's streaming decoder, `push_many`, as the engine thread does). Phonemising is
done first and not timed (the server does it in its frontend thread). Audio seconds per wall second
of that is the most serving could deliver at that batch size; `bench.load` prints the share it does.
"""

from __future__ import annotations

import argparse
import time

from tqdm import tqdm


def load(settings):
    """The voice and its default decoding exactly as `spectts serve` with these settings resolves
    them (decoding "auto": measured here, as the server measures it at start)."""
    from server.app import load_voice
    from server.speech import default_config

    tts = load_voice(settings)
    return tts, default_config(settings, tts)


def batch_audio(tts, plans: list, cfg, prefill_chunk: int, row_budget: int) -> float:
    """Decode and vocode one batch of sentence plans; returns its seconds of audio."""
    results = tts.engine.generate_batch(
        [p.prompt for p in plans], [tts.generation_config(p, cfg) for p in plans],
        [tts.rule(p) for p in plans], prefill_chunk, row_budget)
    decoders = [tts.stream_decoder() for _ in plans]
    frames = [tts.take_frames(r.tokens, 0)[0] for r in results]
    audio = tts.push_many(decoders, frames)
    samples = sum(len(a) + len(d.flush()) for a, d in zip(audio, decoders))
    return samples / tts.sample_rate


def capacity(tts, cfg, sentences: list[str], batch: int, prefill_chunk: int = 64,
             row_budget: int = 64) -> dict:
    """Audio seconds per wall second of the offline pipeline over `sentences`, `batch` at a time."""
    plans = [p for text in sentences for p in tts.plan(text)]
    batch = max(1, min(batch, tts.engine.cache.max_batch))
    batch_audio(tts, plans[:batch], cfg, prefill_chunk, row_budget)  # warm-up: kernels, caches
    start, audio = time.perf_counter(), 0.0
    for i in range(0, len(plans), batch):
        audio += batch_audio(tts, plans[i:i + batch], cfg, prefill_chunk, row_budget)
    wall = time.perf_counter() - start
    return {"batch": batch, "sentences": len(plans), "audio_seconds": audio, "wall_seconds": wall,
            "audio_seconds_per_second": audio / wall}


def capacities_for_load(args: argparse.Namespace, levels: list[int], modes: list[str],
                        sentences: list[str]) -> dict[int, dict]:
    """`bench.load`'s offline figures: the capacity at each batch size its table needs (batched
    mode: min(N, max batch); single: 1), each over the largest level's sentences (the clients speak
    sentences[0 : N * requests per client]), in this process before any server runs."""
    from server.settings import Settings
    from server.speech import describe

    settings = Settings(threads=args.threads, max_batch=args.max_batch, decoding=args.decoding,
                        accept=args.accept, log_level="warning",
                        **({"bundle": args.bundle} if args.bundle else {}))
    tts, cfg = load(settings)
    texts = [sentences[i % len(sentences)] for i in range(max(levels) * args.requests_per_client)]
    # every mode but "single" batches (a Ray replica or a running server too): one engine's figure
    batches = {min(n, args.max_batch) for n in levels} if set(modes) - {"single"} else set()
    batches |= {1} if "single" in modes else set()
    out = {}
    for b in tqdm(sorted(batches), desc="offline capacity"):
        out[b] = {**capacity(tts, cfg, texts, b, settings.prefill_chunk, settings.row_budget),
                  "default": describe(cfg, tts)}  # "auto" was measured here: may differ a little
    return out

