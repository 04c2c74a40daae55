"""Corpus text -> espeak-ng audio, phoneme alignment, log-mel, k-means speech tokens, in shards.

    python -m models.recipes.prepare --corpus data/voice/corpus.txt --out data/voice [--workers 2]

Stages (each resumable: finished shards are skipped):
1. synthesise every sentence with espeak-ng (en-us), align its phonemes to 50 Hz frames, compute
   log-mel -> `shards/{train,valid}-NNNN.npz` without tokens;
2. k-means (K=512) over a sample of frames -> `codebook.npy` (512, 80);
3. tokens for every frame, added to each shard.

A shard holds N utterances, concatenated, with offsets (N + 1,) for each array:
    audio int16 (frames * HOP samples each), mel float16 (frames, 80), tokens int16 (frames,),
    phonemes int16 (phoneme-vocab ids), durations int16 (frames of each phoneme, summing to frames),
    text (N,) str.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.speech_tokenizer import HOP, SAMPLE_RATE, LogMel, assign_tokens, kmeans

SHARD_SIZE = 1000
VALID_FRACTION = 0.02


def synth_shard(job: tuple[list[str], Path]) -> int:
    """Synthesise one shard of sentences (runs in a worker process)."""
    from models.voices.frontend import Espeak, PhonemeVocab, normalize

    sentences, path = job
    torch.set_num_threads(1)
    espeak, vocab, logmel = Espeak("en-us"), PhonemeVocab(), LogMel()
    assert espeak.sample_rate == SAMPLE_RATE
    audio, mel, phonemes, durations, texts = [], [], [], [], []
    for text in sentences:
        utt = espeak.synthesize(normalize(text))
        frames = len(utt.audio) // HOP
        if frames < 5 or not utt.phonemes:
            continue
        wav = utt.audio[:frames * HOP]
        with torch.no_grad():
            mel.append(logmel(torch.from_numpy(wav)[None])[0].numpy().astype(np.float16))
        audio.append((np.clip(wav, -1, 1) * 32767).astype(np.int16))
        phonemes.append(np.asarray(vocab.to_ids(utt.phonemes), dtype=np.int16))
        durations.append(utt.frame_durations(HOP))
        texts.append(text)
    return write_shard(path, audio, mel, phonemes, durations, texts)


def write_shard(path: Path, audio: list[np.ndarray], mel: list[np.ndarray], phonemes: list[np.ndarray],
                durations: list[np.ndarray], texts: list[str]) -> int:
    """One shard of utterances, concatenated with (N + 1,) offsets (the format in this module's
    docstring), written atomically; returns N."""
    offsets = lambda xs: np.cumsum([0] + [len(x) for x in xs]).astype(np.int64)  # noqa: E731
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, audio=np.concatenate(audio), audio_offsets=offsets(audio),
             mel=np.concatenate(mel), mel_offsets=offsets(mel),
             phonemes=np.concatenate(phonemes), phoneme_offsets=offsets(phonemes),
             durations=np.concatenate(durations), text=np.asarray(texts))
    tmp.rename(path)
    return len(texts)


def shard_jobs(corpus: Path, out: Path) -> list[tuple[list[str], Path]]:
    lines = [ln.strip() for ln in corpus.read_text(encoding="utf-8").splitlines() if ln.strip()]
    n_valid = max(1, int(len(lines) * VALID_FRACTION))
    splits = {"valid": lines[:n_valid], "train": lines[n_valid:]}
    jobs = []
    for split, items in splits.items():
        for i in range(0, len(items), SHARD_SIZE):
            jobs.append((items[i:i + SHARD_SIZE], out / "shards" / f"{split}-{i // SHARD_SIZE:04d}.npz"))
    return jobs


def build_codebook(shards: list[Path], path: Path, k: int = 512, frames: int = 200_000) -> None:
    gen = np.random.default_rng(0)
    mels = [np.load(s)["mel"] for s in shards[:40]]
    pool = np.concatenate(mels).astype(np.float32)
    pick = gen.choice(len(pool), size=min(frames, len(pool)), replace=False)
    centroids = kmeans(torch.from_numpy(pool[pick]), k)
    np.save(path, centroids.numpy().astype(np.float32))


def add_tokens(shard: Path, centroids: torch.Tensor, force: bool = False) -> None:
    data = dict(np.load(shard))
    if "tokens" in data and not force:
        return
    tokens = assign_tokens(torch.from_numpy(data["mel"].astype(np.float32)), centroids)
    data["tokens"] = tokens.numpy().astype(np.int16)
    data["token_offsets"] = data["mel_offsets"]
    tmp = shard.with_suffix(".tmp.npz")
    np.savez(tmp, **data)
    tmp.rename(shard)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=Path("data/voice/corpus.txt"))
    ap.add_argument("--out", type=Path, default=Path("data/voice"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--limit", type=int, default=0, help="only the first N shards (smoke runs)")
    ap.add_argument("--codebook-from", type=Path, default=None,
                    help="a voice bundle (or its tokenizer.safetensors): use its codebook instead of "
                         "k-means, so training continues a shipped voice whose vocoder reads it")
    args = ap.parse_args()
    torch.set_num_threads(args.workers)
    (args.out / "shards").mkdir(parents=True, exist_ok=True)
    jobs = shard_jobs(args.corpus, args.out)
    if args.limit:
        jobs = jobs[:args.limit]
    todo = [j for j in jobs if not j[1].exists()]
    t0 = time.time()
    # a fresh process per shard: espeak-ng keeps state across calls, so this makes shards reproducible
    with mp.get_context("spawn").Pool(args.workers, maxtasksperchild=1) as pool:
        for _ in tqdm(pool.imap_unordered(synth_shard, todo), total=len(todo), desc="synthesise"):
            pass
    print(f"synthesis: {time.time() - t0:.0f} s")
    shards = [j[1] for j in jobs]
    codebook = args.out / "codebook.npy"
    force = False
    if args.codebook_from is not None:
        from safetensors.numpy import load_file

        src = args.codebook_from
        given = load_file(src / "tokenizer.safetensors" if src.is_dir() else src)["centroids"]
        given = given.astype(np.float32)
        force = not (codebook.exists() and np.array_equal(np.load(codebook), given))
        np.save(codebook, given)  # a new codebook: every shard is tokenised again
    elif not codebook.exists():
        t0 = time.time()
        build_codebook([s for s in shards if "train" in s.name], codebook)
        print(f"k-means: {time.time() - t0:.0f} s")
    centroids = torch.from_numpy(np.load(codebook))
    t0 = time.time()
    for shard in tqdm(shards, desc="tokens"):
        add_tokens(shard, centroids, force)
    print(f"tokens: {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
