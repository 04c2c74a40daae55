"""Rebuild the default voice from scratch, one command, resumable:

    .venv/bin/python -m models.recipes.recipe [--threads 2] [--out models/default_voice]

Stages (each skips what is already done, training stages resume from their checkpoints; times are
for 2 CPU cores):
  1. corpus     ~40k English sentences (fortunes, word lists, templates, public-domain prose)  ~1 min
  2. prepare    espeak-ng audio, phoneme alignment, log-mel, k-means K=512 tokens (~42 h)      ~6 min
  3. vocoder    causal Vocos from tokens to waveform (2 h of audio)                            ~25 min
     vocoder-ft its fine-tune: 3000 more steps on 10 h, LR 3e-4 -> cosine (one thread: ~50 min)
  4. lm         interleaved speech LM (ELLA-V layout)                                          hours
  5. heads      draft heads on the frozen LM                                                   ~20 min
  6. draft      one-layer draft model distilled from the LM                                    ~20 min
  7. assemble   float16 bundle in --out
  8. gta        the LM's teacher-forced tokens for the first 6 h of training audio               ~8 min
  9. vocoder-gta the vocoder fine-tuned on them (half the crops) and the true tokens (one thread: ~25 min)
 10. assemble-gta the bundle again, with that vocoder: the shipped voice
Interrupt at any time; run the same command again to go on.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


def run(stage: str, args: list[str], threads: int) -> None:
    start = time.time()
    print(f"== {stage}: {' '.join(args)}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, "-m", *args], check=True, env=env)
    print(f"== {stage} took {(time.time() - start) / 60:.1f} min", flush=True)


def run_stages(stages: list[tuple[str, list[str], bool]], until: str, threads: int) -> None:
    """Run each (name, module args, done already) stage in order, skipping the done ones, up to and
    including the stage named `until`."""
    for name, cmd, done in stages:
        if done:
            print(f"== {name}: done already", flush=True)
        else:
            run(name, cmd, threads)
        if name == until:
            break


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data", default="data/voice")
    ap.add_argument("--out", default="models/default_voice")
    ap.add_argument("--vocoder-steps", type=int, default=1500)
    ap.add_argument("--vocoder-ft-steps", type=int, default=3000)
    ap.add_argument("--vocoder-gta-steps", type=int, default=1500)
    ap.add_argument("--lm-steps", type=int, default=20000)
    ap.add_argument("--heads-steps", type=int, default=1500)
    ap.add_argument("--draft-steps", type=int, default=1500)
    ap.add_argument("--until", default="assemble-gta", help="stop after this stage")
    args = ap.parse_args()
    data, t, dev = Path(args.data), str(args.threads), args.device
    forever = ["--minutes", "100000"]
    stages = [
        ("corpus", ["models.recipes.corpus", "--out", str(data / "corpus.txt")],
         (data / "corpus.txt").exists()),
        ("prepare", ["models.recipes.prepare", "--corpus", str(data / "corpus.txt"), "--out", str(data),
                     "--workers", t], False),  # resumes by itself
        ("vocoder", ["models.recipes.train_vocoder", "--data", str(data), "--ckpt",
                     "checkpoints/vocoder", "--out", "checkpoints/vocoder/export", "--threads", t,
                     "--device", dev, "--total-steps", str(args.vocoder_steps), *forever],
         Path("checkpoints/vocoder/export/vocoder.safetensors").exists()),
        ("vocoder-ft", ["models.recipes.train_vocoder", "--data", str(data), "--init-from",
                        "checkpoints/vocoder/export", "--ckpt", "checkpoints/vocoder_ft", "--out",
                        "checkpoints/vocoder_ft/export", "--threads", t, "--device", dev,
                        "--max-hours-audio", "10", "--lr", "3e-4", "--warmup", "50",
                        "--total-steps", str(args.vocoder_ft_steps), *forever],
         Path("checkpoints/vocoder_ft/export/vocoder.safetensors").exists()),
        ("lm", ["models.recipes.train_lm", "--data", str(data), "--ckpt", "checkpoints/lm",
                "--threads", t, "--device", dev, "--total-steps", str(args.lm_steps), *forever], False),
        ("lm-export", ["models.recipes.train_lm", "--data", str(data), "--ckpt", "checkpoints/lm",
                       "--export", "checkpoints/lm/export"], False),
        ("heads", ["models.recipes.train_drafts", "--what", "heads", "--data", str(data),
                   "--lm", "checkpoints/lm/export", "--threads", t, "--device", dev,
                   "--total-steps", str(args.heads_steps), *forever], False),
        ("heads-export", ["models.recipes.train_drafts", "--what", "heads", "--lm",
                          "checkpoints/lm/export", "--export", "checkpoints/drafts/heads_export"],
         False),
        ("draft", ["models.recipes.train_drafts", "--what", "draft", "--data", str(data),
                   "--lm", "checkpoints/lm/export", "--threads", t, "--device", dev,
                   "--total-steps", str(args.draft_steps), *forever], False),
        ("draft-export", ["models.recipes.train_drafts", "--what", "draft", "--lm",
                          "checkpoints/lm/export", "--export", "checkpoints/drafts/draft_export"],
         False),
        ("assemble", ["models.recipes.assemble", "--data", str(data), "--out", args.out,
                      "--vocoder", "checkpoints/vocoder_ft/export"], False),
        ("gta", ["models.recipes.gta_tokens", "--data", str(data), "--bundle", args.out,
                 "--shards", "6", "--threads", t], False),  # skips the shards already done
        ("vocoder-gta", ["models.recipes.train_vocoder", "--data", str(data), "--init-from",
                         "checkpoints/vocoder_ft/export", "--ckpt", "checkpoints/vocoder_gta", "--out",
                         "checkpoints/vocoder_gta/export", "--threads", t, "--device", dev,
                         "--max-hours-audio", "6.4", "--lr", "2e-4", "--warmup", "50",
                         "--total-steps", str(args.vocoder_gta_steps), "--gta-mix", "0.5", *forever],
         Path("checkpoints/vocoder_gta/export/vocoder.safetensors").exists()),
        ("assemble-gta", ["models.recipes.assemble", "--data", str(data), "--out", args.out,
                          "--vocoder", "checkpoints/vocoder_gta/export"], False),
    ]
    run_stages(stages, args.until, args.threads)


if __name__ == "__main__":
    main()
