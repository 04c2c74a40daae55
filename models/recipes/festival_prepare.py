"""Corpus text -> Festival (SLT HTS) audio, phone alignment and log-mel, in resumable shards.

    python -m models.recipes.festival_prepare --out data/festival [--sentences 50000] [--workers 2]

1. the corpus: `models.recipes.corpus` sources (fortunes, prose, word lists, templates with numbers,
   money, dates, questions and lists), the held-out evaluation sentences excluded -> corpus.txt;
2. every sentence synthesised by a long-lived Festival worker per process, its phones aligned to
   50 Hz frames from HTS's own segment end times, log-mel -> `shards/{train,valid}-NNNN.npz`.
   Finished shards are skipped, so the command resumes where it stopped.

A shard holds N utterances, concatenated, with offsets (N + 1,) for each array:
    audio int16 (frames * HOP samples each), mel float16 (frames, 80),
    phonemes int16 (ids in FESTIVAL_PHONES), durations int16 (frames of each phone, summing to
    frames), text (N,) str.
Speech tokens are added later by the tokenizer stage.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.voices.frontend import PhonemeVocab
from models.speech_tokenizer import HOP, SAMPLE_RATE, LogMel
from models.recipes.prepare import shard_jobs, write_shard
from models.voices.festival import FESTIVAL_PHONES, Festival, FestivalError, fold


def synth_shard(job: tuple[list[str], Path]) -> int:
    """Synthesise one shard of sentences (runs in a worker process)."""
    sentences, path = job
    torch.set_num_threads(1)
    vocab, logmel = PhonemeVocab(FESTIVAL_PHONES), LogMel()
    audio, mel, phonemes, durations, texts = [], [], [], [], []
    with Festival(sample_rate=SAMPLE_RATE, timeout_s=30) as festival:
        for text in sentences:
            try:
                utt = festival.synthesize(fold(text))
            except FestivalError:
                continue
            frames = len(utt.audio) // HOP
            if frames < 5 or not utt.phones:
                continue
            wav = utt.audio[:frames * HOP]
            with torch.no_grad():
                mel.append(logmel(torch.from_numpy(wav)[None])[0].numpy().astype(np.float16))
            audio.append((np.clip(wav, -1, 1) * 32767).astype(np.int16))
            phonemes.append(np.asarray(vocab.to_ids(utt.phones), dtype=np.int16))
            durations.append(utt.frame_durations(HOP, SAMPLE_RATE))
            texts.append(text)
    return write_shard(path, audio, mel, phonemes, durations, texts)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("data/festival"))
    ap.add_argument("--sentences", type=int, default=50000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--limit", type=int, default=0, help="only the first N shards (smoke runs)")
    args = ap.parse_args(argv)
    from models.recipes.corpus import build_corpus

    corpus = args.out / "corpus.txt"
    if not corpus.exists():
        build_corpus(corpus, args.sentences)
    (args.out / "shards").mkdir(parents=True, exist_ok=True)
    PhonemeVocab(FESTIVAL_PHONES).save(args.out / "phonemes.json")
    jobs = shard_jobs(corpus, args.out)
    if args.limit:
        jobs = jobs[:args.limit]
    todo = [j for j in jobs if not j[1].exists()]
    t0 = time.time()
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for _ in tqdm(pool.imap_unordered(synth_shard, todo), total=len(todo), desc="festival"):
            pass
    print(f"synthesis: {time.time() - t0:.0f} s for {len(todo)} shards")


if __name__ == "__main__":
    main()
