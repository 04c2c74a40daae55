"""Ground-truth-aligned (GTA) speech tokens: what the speech LM predicts for each frame of the training
audio, teacher-forced on the true sequence, for fine-tuning the vocoder on the LM's kind of tokens.

    python -m models.recipes.gta_tokens [--bundle models/default_voice] [--shards 6]

As Tacotron 2 trained WaveNet on the mel frames it predicted teacher-forced (aligned to the true audio
because the history is the true one), each true speech frame here gets the LM's greedy token at that
position, restricted as at inference to the phoneme's allowed tokens (the bundle's `phoneme_tokens`
at its coverage; EOP excluded: the frame exists). A vocoder trained on (these tokens -> true audio)
learns to render the LM's confusions as the sound that was meant. Writes DATA/gta/<shard>.npy, int16
(frames,), aligned with the shard's `tokens`; shards already done are skipped (delete DATA/gta after
retraining the LM).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.llama import LlamaForCausalLM
from models.voices.bundle import load_bundle
from models.voices.interleaved import (SPEECH_BASE, load_phoneme_counts, phoneme_allowed_masks,
                                training_sequence)


@torch.no_grad()
def predict_utterance(model: LlamaForCausalLM, phonemes: np.ndarray, durations: np.ndarray,
                      tokens: np.ndarray, allowed: torch.Tensor) -> np.ndarray:
    """One utterance -> (frames,) int16: the LM's teacher-forced greedy codebook id at each frame.
    allowed (phonemes, num_speech) bool: the speech tokens each phoneme may produce."""
    ids, target = training_sequence(phonemes, durations, tokens)  # (L,), (L,)
    hidden = model(torch.from_numpy(ids[:-1])[None])[0]  # (L-1, D): position t predicts ids[t + 1]
    is_speech = torch.from_numpy(target[1:] & (ids[1:] >= SPEECH_BASE))  # (L-1,)
    logits = model.logits(hidden[is_speech])[:, SPEECH_BASE:]  # (frames, num_speech)
    frame_phoneme = torch.from_numpy(np.repeat(phonemes.astype(np.int64), durations))  # (frames,)
    logits = logits.masked_fill(~allowed[frame_phoneme], float("-inf"))
    return logits.argmax(-1).to(torch.int16).numpy()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("data/voice"))
    ap.add_argument("--bundle", type=Path, default=Path("models/default_voice"),
                    help="its target LM and phoneme constraint")
    ap.add_argument("--shards", type=int, default=6, help="the first N train shards (~1 h each)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    bundle = load_bundle(args.bundle)
    model, layout, entry = bundle.target, bundle.tokens, bundle.raw["phoneme_tokens"]
    if layout.speech[0] != SPEECH_BASE:
        raise ValueError(f"{args.bundle}: speech tokens start at {layout.speech[0]}, not {SPEECH_BASE}")
    counts = load_phoneme_counts(args.bundle, entry)
    masks = phoneme_allowed_masks(layout, counts, float(entry["coverage"]), model.config.vocab_size)
    allowed = torch.stack(masks)[:, layout.speech[0]:layout.speech[1]]  # (phonemes, num_speech)
    train = sorted((args.data / "shards").glob("train-*.npz"))
    out_dir = args.data / "gta"
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in train[:args.shards]:
        out = out_dir / f"{path.stem}.npy"
        if out.exists():
            continue
        z = np.load(path)
        po, to = z["phoneme_offsets"], z["token_offsets"]
        ph, du, tok = z["phonemes"], z["durations"], z["tokens"]
        pred = np.zeros(len(tok), dtype=np.int16)
        same = 0
        for i in tqdm(range(len(po) - 1), desc=path.stem, mininterval=5.0):
            a, b = to[i], to[i + 1]
            pred[a:b] = predict_utterance(model, ph[po[i]:po[i + 1]], du[po[i]:po[i + 1]],
                                          tok[a:b], allowed)
            same += int((pred[a:b] == tok[a:b]).sum())
        tmp = out.with_suffix(".tmp.npy")
        np.save(tmp, pred)
        tmp.rename(out)
        print(f"{path.stem}: {len(tok)} frames, {same / max(1, len(tok)):.3f} equal to the true tokens",
              flush=True)


if __name__ == "__main__":
    main()
