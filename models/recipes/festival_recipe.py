"""The natural voices, taught by Festival's SLT HTS voice, rebuilt by one resumable command:

    .venv/bin/python -m models.recipes.festival_recipe [--voice tts-1|tts-1-hd] [--threads 2]
        [--data data/festival] [--checkpoints checkpoints/festival] [--mirror DIR] [--until STAGE]

Stages (each skips what is done; training stages resume from their last checkpoint, so stop it at
any time and run the same command again):
  1. prepare     corpus (50k sentences, evaluation sentences excluded; the first 26k spoken)
                 -> Festival audio, phone timings, log-mel, in shards of 1000 (~1.2 h each)
  2. codec       FSQ tokenizer + causal Vocos, spectral losses, until the tokenizer is frozen
  3. tokenizer   export the tokenizer (encoder) and the vocoder at that point
  4. tokenize    the tokenizer's codes into every shard
  5. lm          the voice's interleaved speech LM on phones + codes (then exported)
  6. heads       its draft heads, then a one-layer draft model (each exported)
  7. codec-gan   the voice assembled with the spectral-phase vocoder (VOICE-spectral, for early
                 evaluation); the vocoder against the MPD / MRD discriminators (tokenizer frozen),
                 exported
  8. assemble    the voice's bundle in --out (the shipped default changes only by hand,
                 once the bundle beats the shipped voice on the development set)
The two voices share stages 1-4 and 7 (corpus, tokenizer, tokens, vocoder): `--voice tts-1-hd` after
`tts-1` trains only its own LM, heads and draft model (checkpoints/festival/{lm,drafts}-hd).
`--mirror DIR` keeps a copy of every checkpoint outside the work tree.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from models.recipes.recipe import run_stages

# name -> (LM shape, checkpoint suffix, bundle weights' dtype)
VOICES = {
    # small and fast: 7.4M parameters, 15 MB in float16, inside the CPU's last-level cache
    "tts-1": ('{"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 6}', "",
              "float16"),
    # 23.5M parameters, 47 MB in bfloat16: past the 32 MB last-level cache, where a forward of
    # 8 rows costs about one of 1 row and speculation pays (issue #20's measurement)
    "tts-1-hd": ('{"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 6, '
                 '"num_attention_heads": 8, "num_key_value_heads": 4}', "-hd", "bfloat16"),
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--voice", choices=list(VOICES), default="tts-1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data", type=Path, default=Path("data/festival"))
    ap.add_argument("--checkpoints", type=Path, default=Path("checkpoints/festival"))
    ap.add_argument("--mirror", default="", help="a copy of each checkpoint goes here")
    ap.add_argument("--shards", type=int, default=26, help="corpus shards: 1 valid + 25 train (~31 h)")
    ap.add_argument("--codec-steps", type=int, default=8000,
                    help="spectral steps, then GAN steps up to this total")
    ap.add_argument("--codec-freeze", type=int, default=3000, help="tokenizer frozen from this step")
    ap.add_argument("--lm-steps", type=int, default=5000,
                    help="~4 epochs of the 31 h corpus at 8192 tokens a step (tts-1: 2.45 s a "
                         "step on 2 threads, 3.4 h)")
    ap.add_argument("--heads-steps", type=int, default=1500)
    ap.add_argument("--draft-steps", type=int, default=1500)
    ap.add_argument("--out", type=Path, default=None,
                    help="the assembled bundle (default: CHECKPOINTS/VOICE)")
    ap.add_argument("--until", default="assemble", help="stop after this stage")
    args = ap.parse_args(argv)
    data, ck, t = args.data, args.checkpoints, str(args.threads)
    shape, suffix, dtype = VOICES[args.voice]
    out = args.out or ck / args.voice
    forever = ["--minutes", "100000"]
    codec = ["models.recipes.train_codec", "--data", str(data), "--ckpt", str(ck / "codec"),
             "--threads", t, "--device", args.device, "--total-steps", str(args.codec_steps),
             "--gan-start", str(args.codec_freeze)]
    if args.mirror:
        codec += ["--mirror", str(Path(args.mirror) / "codec")]
    lm_mirror = ["--mirror", str(Path(args.mirror) / f"lm{suffix}")] if args.mirror else []
    lm_ck, drafts_ck = ck / f"lm{suffix}", ck / f"drafts{suffix}"
    tokenizer, lm = ck / "codec" / "frozen", lm_ck / "export"
    drafts = ["models.recipes.train_drafts", "--data", str(data), "--lm", str(lm), "--ckpt",
              str(drafts_ck), "--threads", t, "--device", args.device]
    assemble = ["models.recipes.assemble", "--frontend", "festival", "--name", args.voice,
                "--data", str(data), "--lm", str(lm), "--heads", str(drafts_ck / "heads"),
                "--draft", str(drafts_ck / "draft"), "--dtype", dtype,
                "--encoder", str(tokenizer / "encoder")]
    stages = [
        ("prepare", ["models.recipes.festival_prepare", "--out", str(data), "--workers", t,
                     "--limit", str(args.shards)], False),  # resumes by itself
        ("codec", [*codec, "--stop-at", str(args.codec_freeze), *forever],
         (tokenizer / "encoder").exists()),
        ("tokenizer", ["models.recipes.train_codec", "--ckpt", str(ck / "codec"), "--export",
                       str(tokenizer)], (tokenizer / "encoder").exists()),
        ("tokenize", ["models.recipes.train_codec", "--data", str(data), "--threads", t,
                      "--tokenize", str(tokenizer / "encoder")], False),  # skips tokenised shards
        ("lm", ["models.recipes.train_lm", "--data", str(data), "--ckpt", str(lm_ck),
                "--threads", t, "--device", args.device, "--total-steps", str(args.lm_steps),
                "--model", shape, *lm_mirror, *forever], False),
        ("lm-export", ["models.recipes.train_lm", "--data", str(data), "--ckpt", str(lm_ck),
                       "--export", str(lm)], False),
        ("heads", [*drafts, "--what", "heads", "--total-steps", str(args.heads_steps), *forever],
         False),
        ("draft", [*drafts, "--what", "draft", "--total-steps", str(args.draft_steps), *forever],
         False),
        ("heads-export", ["models.recipes.train_drafts", "--what", "heads", "--lm", str(lm),
                          "--ckpt", str(drafts_ck), "--export", str(drafts_ck / "heads")], False),
        ("draft-export", ["models.recipes.train_drafts", "--what", "draft", "--lm", str(lm),
                          "--ckpt", str(drafts_ck), "--export", str(drafts_ck / "draft")], False),
        # the voice with the tokenizer's own (spectral-phase) vocoder: evaluated while the GAN trains
        ("assemble-spectral", [*assemble, "--vocoder", str(tokenizer / "vocoder"),
                               "--out", str(out.with_name(out.name + "-spectral"))], False),
        ("codec-gan", [*codec, *forever], False),
        ("vocoder", ["models.recipes.train_codec", "--ckpt", str(ck / "codec"), "--export",
                     str(ck / "codec" / "final")], False),
        ("assemble", [*assemble, "--vocoder", str(ck / "codec" / "final" / "vocoder"),
                      "--out", str(out)], False),
    ]
    run_stages(stages, args.until, args.threads)


if __name__ == "__main__":
    main()
