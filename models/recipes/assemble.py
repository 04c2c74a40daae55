"""Assemble the voice bundle from the trained parts (weights stored as float16 to fit the repo budget).

    python -m models.recipes.assemble --out models/default_voice

Reads checkpoints/lm/export (target), checkpoints/drafts/heads_export (draft heads + measured
accuracies), checkpoints/drafts/draft_export (draft model), checkpoints/vocoder/export (vocoder),
data/voice (codebook, phoneme durations for the per-phoneme frame cap).

A voice taught by Festival (`--frontend festival`, data/festival) has a learned tokenizer instead of
a k-means codebook: `--encoder DIR` (the FSQ mel encoder, `models.codec`) is copied into the bundle
as its tokenizer, and its phones are `FESTIVAL_PHONES`.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from models.llama import LlamaForCausalLM
from models.recipes.train_drafts import SHARES_FILE
from models.recipes.train_lm import num_speech_tokens
from models.voices import interleaved
from models.voices.bundle import PHONEME_DURATIONS
from models.voices.festival import FESTIVAL_PHONES
from models.voices.frontend import EN_US_PHONEMES, PhonemeVocab

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def max_frames_per_phoneme(data: Path) -> int:
    """Twice the longest phoneme seen in training: a cap that never binds on normal speech but
    guarantees every generation ends."""
    longest = max(int(np.load(s)["durations"].max()) for s in sorted((data / "shards").glob("train-*.npz")))
    return 2 * longest


def write_phoneme_tokens(data: Path, out: Path, coverage: float) -> dict:
    """Count which speech tokens each phoneme was spoken with (train shards) into
    OUT/phoneme_tokens.safetensors; returns the bundle entry that points at it."""
    num_speech = num_speech_tokens(data)
    counts = np.zeros((interleaved.PHONEME_SLOTS, num_speech), dtype=np.int64)
    for shard in sorted((data / "shards").glob("train-*.npz")):
        z = np.load(shard)
        counts += interleaved.phoneme_token_counts(z["phonemes"], z["durations"], z["tokens"],
                                                   num_speech)
    return interleaved.save_phoneme_counts(out, counts, coverage)


def half(tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float16
         ) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype).contiguous() if v.is_floating_point() else v for k, v in tensors.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--lm", type=Path, default=Path("checkpoints/lm/export"))
    ap.add_argument("--heads", type=Path, default=Path("checkpoints/drafts/heads_export"))
    ap.add_argument("--draft", type=Path, default=Path("checkpoints/drafts/draft_export"))
    ap.add_argument("--vocoder", type=Path, default=Path("checkpoints/vocoder/export"))
    ap.add_argument("--data", type=Path, default=Path("data/voice"))
    ap.add_argument("--out", type=Path, default=Path("models/default_voice"))
    ap.add_argument("--tree-nodes", type=int, default=16)
    ap.add_argument("--phoneme-coverage", type=float, default=0.99,
                    help="each phoneme may only use the speech tokens covering this share of its "
                         "training frames (1: no restriction)")
    ap.add_argument("--phoneme-durations", choices=PHONEME_DURATIONS, default=None,
                    help="the voice's default: the frontend's phoneme durations forced (frontend), or "
                         "the LM's end-of-phoneme markers (model); default: frontend for espeak-ng, "
                         "model for Festival (its durations need HTS synthesis)")
    ap.add_argument("--frontend", choices=["espeak", "festival"], default="espeak")
    ap.add_argument("--encoder", type=Path, default=None,
                    help="the learned tokenizer (models.codec.MelEncoder dir) of a Festival voice")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float16",
                    help="the LM, draft model and heads' stored dtype (bfloat16: a voice that runs "
                         "in bfloat16; the vocoder and tokenizer stay float16)")
    ap.add_argument("--name", default=None, help="the bundle's name (default: espeak-en-us / "
                    "festival-slt)")
    args = ap.parse_args()

    out = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    festival = args.frontend == "festival"
    durations = args.phoneme_durations or ("model" if festival else "frontend")
    layout = interleaved.token_layout(num_speech_tokens(args.data))
    raw: dict = {"format": "spectts-bundle/1",
                 "name": args.name or ("festival-slt" if festival else "espeak-en-us"),
                 "description": ("SpecTTS voice, trained here from Festival's SLT HTS voice" if festival
                                 else "SpecTTS default voice, trained here from espeak-ng en-us"),
                 "sample_rate": 22050, "target": "target",
                 "tokens": {"phonemes": list(layout.phonemes), "speech": list(layout.speech),
                            "bos": layout.bos, "sep": layout.sep, "eop": layout.eop, "eos": layout.eos},
                 "max_frames_per_phoneme": max_frames_per_phoneme(args.data),
                 "phoneme_durations": durations,
                 "frontend": ({"kind": "festival", "phonemes": "phonemes.json"} if festival
                              else {"voice": "en-us", "phonemes": "phonemes.json"}),
                 "tokenizer": ({"encoder": "tokenizer", "frame_rate": 50} if festival
                               else {"codebook": "tokenizer.safetensors", "frame_rate": 50}),
                 "vocoder": "vocoder"}
    store = DTYPES[args.dtype]
    LlamaForCausalLM.from_pretrained(args.lm).save_pretrained(out / "target", dtype=store)
    if (args.draft / "config.json").exists():
        shares = (json.loads((args.draft / SHARES_FILE).read_text())
                  if (args.draft / SHARES_FILE).exists() else [])
        lm = dict(LlamaForCausalLM.from_pretrained(args.lm).named_parameters())
        draft = LlamaForCausalLM.from_pretrained(args.draft, shared={n: lm[n] for n in shares})
        draft.save_pretrained(out / "draft", dtype=store, leave_out=tuple(shares))
        raw["draft"] = "draft"
        if shares:
            raw["draft_shares"] = shares
    if (args.heads / "heads.safetensors").exists():
        meta = json.loads((args.heads / "heads.json").read_text())
        save_file(half(load_file(str(args.heads / "heads.safetensors")), store),
                  str(out / "heads.safetensors"))
        raw["heads"] = {"file": "heads.safetensors", "num_heads": meta["num_heads"],
                        "shared_out": meta.get("shared_out", False),
                        "accuracies": meta["metrics"]["accuracies"],
                        "accuracies_tolerance": meta["metrics"].get("accuracies_tolerance"),
                        "tree_nodes": args.tree_nodes,
                        "tree": None}
    (out / "vocoder").mkdir()
    save_file(half(load_file(str(args.vocoder / "vocoder.safetensors"))),
              str(out / "vocoder" / "vocoder.safetensors"))
    shutil.copy(args.vocoder / "vocoder.json", out / "vocoder" / "vocoder.json")
    PhonemeVocab(FESTIVAL_PHONES if festival else EN_US_PHONEMES).save(out / "phonemes.json")
    if festival:
        if args.encoder is None:
            raise SystemExit("--frontend festival needs --encoder (the learned tokenizer)")
        shutil.copytree(args.encoder, out / "tokenizer")
        for weights in (out / "tokenizer").glob("*.safetensors"):  # float16 as the rest
            save_file(half(load_file(str(weights))), str(weights))
    else:
        codebook = np.load(args.data / "codebook.npy")
        save_file({"centroids": torch.from_numpy(codebook)}, str(out / "tokenizer.safetensors"))
    raw["phoneme_tokens"] = write_phoneme_tokens(args.data, out, args.phoneme_coverage)
    (out / "spectts.json").write_text(json.dumps(raw, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"bundle written to {out}: {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
