"""Train the speech tokenizer (FSQ mel encoder) and the causal Vocos vocoder together, resumably.

    python -m models.recipes.train_codec --data data/festival --ckpt checkpoints/codec --minutes 60
    python -m models.recipes.train_codec --data data/festival --ckpt checkpoints/codec --export DIR
    python -m models.recipes.train_codec --data data/festival --tokenize DIR   # codes into the shards

Generator: log-mel -> `MelEncoder` (non-causal) -> FSQ codes -> `CodeEmbedding` -> `CausalVocos`
-> audio. Batches are random frame-aligned crops; the encoder sees `margin` extra frames on each side
(its receptive field), so a crop's codes equal those of the whole utterance away from its edges.

Two phases over one LR schedule:
1. steps < gan_start: multi-resolution mel + STFT losses (`SpectralLoss`), everything trained;
2. from gan_start: the encoder and code embedding are frozen (the tokens no longer change, so the
   speech LM can be trained on them meanwhile), and the vocoder is trained against the
   multi-period and multi-resolution discriminators (LSGAN + feature matching), spectral loss kept.

CKPT/last.pt holds both networks, both optimisers, the step and the RNG states; it is written every
`--save-every-minutes` and at the end, copied to `--mirror` when given (a copy outside the work
tree), and a run resumes from it. `--export DIR` writes DIR/encoder (the tokenizer) and DIR/vocoder
(a plain `CausalVocos` over code ids, the FSQ embedding folded into its table).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from models.codec import CodeEmbedding, EncoderConfig, MelEncoder, fold_into_vocoder
from models.recipes.discriminators import (MultiPeriodDiscriminator, MultiResolutionDiscriminator,
                                           d_loss, fm_loss, g_loss)
from models.vocoder import CausalVocos, VocoderConfig
from models.recipes.train_vocoder import Corpus, SpectralLoss, load_corpus, lr_at


@dataclass
class TrainConfig:
    data: str = "data/festival"
    ckpt: str = "checkpoints/codec"
    mirror: str = ""
    minutes: float = 60.0
    threads: int = 2
    device: str = "cpu"
    max_hours_audio: float = 20.0
    batch: int = 16
    crop_frames: int = 50
    margin: int = 16
    lr: float = 5e-4
    lr_d: float = 2e-4
    warmup: int = 200
    total_steps: int = 20000
    gan_start: int = 6000
    stop_at: int = 0  # end this run at this step (0: total_steps); the schedule stays total_steps
    spectral_weight: float = 15.0
    grad_clip: float = 5.0
    save_every_minutes: float = 5.0
    log_every: int = 50
    valid_utts: int = 32
    seed: int = 0
    encoder: dict = field(default_factory=dict)  # EncoderConfig overrides (fresh runs only)
    vocoder: dict = field(default_factory=dict)  # VocoderConfig overrides (fresh runs only)


class Codec(nn.Module):
    """mel (B, T + 2 * margin, n_mels) -> audio (B, T * hop), codes (B, T)."""

    def __init__(self, enc: EncoderConfig, voc: VocoderConfig) -> None:
        super().__init__()
        self.encoder = MelEncoder(enc)
        self.embedding = CodeEmbedding(self.encoder.fsq, voc.n_mels)
        self.vocoder = CausalVocos(VocoderConfig(**{**voc.to_dict(), "num_tokens": 1}))

    def forward(self, mel: torch.Tensor, margin: int) -> tuple[torch.Tensor, torch.Tensor]:
        values, codes = self.encoder(mel)  # (B, T + 2m, D), (B, T + 2m)
        end = mel.shape[1] - margin
        x = self.embedding(values[:, margin:end])  # (B, T, n_mels)
        return self.vocoder.head_audio(self.vocoder.features(x)), codes[:, margin:end]

    def export(self, out: Path) -> None:
        self.encoder.save(out / "encoder")
        fold_into_vocoder(self.vocoder, self.embedding).save(out / "vocoder")


class MelCrops:
    """Random crops: mel with `margin` frames of context each side (zeros past the utterance) and
    the audio of the crop's own frames."""

    def __init__(self, corpus: Corpus, crop: int, margin: int, hop: int, seed: int) -> None:
        self.corpus, self.crop, self.margin, self.hop = corpus, crop, margin, hop
        starts = corpus.utts[:, 3] - crop + 1
        self.index = np.nonzero(starts > 0)[0]
        self.weights = torch.as_tensor(starts[self.index], dtype=torch.float64)
        self.gen = torch.Generator().manual_seed(seed)

    def sample(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> mel (B, crop + 2 * margin, n_mels), audio (B, crop * hop) in [-1, 1]."""
        picks = torch.multinomial(self.weights, batch, replacement=True, generator=self.gen).tolist()
        mels, ys = [], []
        for p in picks:
            shard, a0, f0, frames = (int(v) for v in self.corpus.utts[self.index[p]])
            t0 = int(torch.randint(0, frames - self.crop + 1, (1,), generator=self.gen))
            lo, hi = t0 - self.margin, t0 + self.crop + self.margin
            mel = self.corpus.mel[shard][f0 + max(0, lo):f0 + min(frames, hi)].astype(np.float32)
            mels.append(np.pad(mel, ((max(0, -lo), max(0, hi - frames)), (0, 0))))
            s0 = a0 + t0 * self.hop
            ys.append(self.corpus.audio[shard][s0:s0 + self.crop * self.hop])
        audio = torch.from_numpy(np.stack(ys).astype(np.float32) / 32768.0)
        return torch.from_numpy(np.stack(mels)), audio


def save_checkpoint(path: Path, mirror: str, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # never a half-written last.pt
    if mirror:
        Path(mirror).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(mirror) / "last.tmp")
        os.replace(Path(mirror) / "last.tmp", Path(mirror) / path.name)


@torch.no_grad()
def evaluate(codec: Codec, corpus: Corpus, spectral: SpectralLoss, utts: int, max_frames: int = 250
             ) -> dict[str, float]:
    """Spectral losses of whole utterances through the serving path (codes of the full utterance,
    then the folded vocoder), and the share of the codebook in use."""
    vocoder = fold_into_vocoder(codec.vocoder, codec.embedding)
    sums: dict[str, float] = {}
    used = set()
    rows = corpus.utts[:utts]
    for shard, a0, f0, frames in rows:
        n = int(min(frames, max_frames))
        codes = codec.encoder.encode(corpus.mel[shard][f0:f0 + frames])[:n]
        used.update(codes.tolist())
        audio = vocoder(torch.from_numpy(codes.astype(np.int64))[None])
        y = torch.from_numpy(corpus.audio[shard][a0:a0 + n * vocoder.cfg.hop].astype(np.float32) / 32768)
        for k, v in spectral(audio, y[None]).items():
            sums[k] = sums.get(k, 0.0) + float(v)
    out = {k: v / max(1, len(rows)) for k, v in sums.items()}
    out["codes_used"] = float(len(used))
    return out


def train(cfg: TrainConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    ckpt_path = Path(cfg.ckpt) / "last.pt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True) if ckpt_path.exists() else None
    enc_cfg = EncoderConfig.from_dict(ckpt["encoder_config"] if ckpt else cfg.encoder)
    voc_cfg = VocoderConfig.from_dict(ckpt["vocoder_config"] if ckpt else cfg.vocoder)
    codec = Codec(enc_cfg, voc_cfg)
    mpd, mrd = MultiPeriodDiscriminator(), MultiResolutionDiscriminator()
    gen_params = [{"params": [*codec.encoder.parameters(), *codec.embedding.parameters()], "name": "tok"},
                  {"params": list(codec.vocoder.parameters()), "name": "voc"}]
    opt_g = torch.optim.AdamW(gen_params, lr=cfg.lr, betas=(0.8, 0.99), weight_decay=0.01)
    opt_d = torch.optim.AdamW([*mpd.parameters(), *mrd.parameters()], lr=cfg.lr_d, betas=(0.8, 0.99))
    data = Path(cfg.data)
    corpus = load_corpus(data, "train", cfg.max_hours_audio, voc_cfg.hop, voc_cfg.sample_rate)
    crops = MelCrops(corpus, cfg.crop_frames, cfg.margin, voc_cfg.hop, cfg.seed)
    step = 0
    if ckpt is not None:
        codec.load_state_dict(ckpt["codec"])
        mpd.load_state_dict(ckpt["mpd"])
        mrd.load_state_dict(ckpt["mrd"])
        opt_g.load_state_dict(ckpt["opt_g"])
        opt_d.load_state_dict(ckpt["opt_d"])
        step = int(ckpt["step"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        crops.gen.set_state(ckpt["rng"]["crops"])
        print(f"resumed {ckpt_path} at step {step}")
    spectral = SpectralLoss(voc_cfg.sample_rate)
    n_params = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    print(f"encoder {n_params(codec.encoder):.2f}M ({enc_cfg.levels}: {codec.encoder.num_codes} codes), "
          f"vocoder {n_params(codec.vocoder):.2f}M, discriminators {n_params(mpd) + n_params(mrd):.2f}M; "
          f"train {len(corpus.utts)} utterances, {corpus.hours:.1f} h")

    def state() -> dict:
        return {"codec": codec.state_dict(), "mpd": mpd.state_dict(), "mrd": mrd.state_dict(),
                "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "step": step,
                "encoder_config": enc_cfg.to_dict(), "vocoder_config": voc_cfg.to_dict(),
                "train_config": asdict(cfg),
                "rng": {"torch": torch.get_rng_state(), "crops": crops.gen.get_state()}}

    t0 = last_save = time.monotonic()
    bar = tqdm(total=cfg.total_steps, initial=step, file=sys.stdout, mininterval=5.0)
    last_step = cfg.stop_at or cfg.total_steps
    while step < last_step and time.monotonic() - t0 < cfg.minutes * 60:
        gan = step >= cfg.gan_start
        lr = lr_at(step, cfg.lr, cfg.warmup, cfg.total_steps)
        for group in opt_g.param_groups:
            group["lr"] = 0.0 if (gan and group["name"] == "tok") else lr
        for group in opt_d.param_groups:
            group["lr"] = lr_at(max(0, step - cfg.gan_start), cfg.lr_d, cfg.warmup, cfg.total_steps)
        mel, audio = crops.sample(cfg.batch)
        pred, _ = codec(mel, cfg.margin)
        parts = spectral(pred, audio)
        loss = cfg.spectral_weight * parts["total"]
        if gan:
            opt_d.zero_grad(set_to_none=True)
            fake = pred.detach()
            ld = d_loss(mpd(audio), mpd(fake)) + d_loss(mrd(audio), mrd(fake))
            ld.backward()
            nn.utils.clip_grad_norm_([*mpd.parameters(), *mrd.parameters()], cfg.grad_clip)
            opt_d.step()
            real_p, fake_p, real_r, fake_r = mpd(audio), mpd(pred), mrd(audio), mrd(pred)
            parts["adv"] = g_loss(fake_p) + g_loss(fake_r)
            parts["fm"] = fm_loss(real_p, fake_p) + fm_loss(real_r, fake_r)
            parts["d"] = ld.detach()
            loss = loss + parts["adv"] + 2.0 * parts["fm"]
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(codec.parameters(), cfg.grad_clip)
        opt_g.step()
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0:
            tqdm.write(f"step {step} " + " ".join(f"{k} {float(v):.4f}" for k, v in parts.items())
                       + f" lr {lr:.2e}", file=sys.stdout)
        if time.monotonic() - last_save >= cfg.save_every_minutes * 60:
            save_checkpoint(ckpt_path, cfg.mirror, state())
            last_save = time.monotonic()
    bar.close()
    save_checkpoint(ckpt_path, cfg.mirror, state())
    codec.eval()
    valid = load_corpus(data, "valid", None, voc_cfg.hop, voc_cfg.sample_rate)
    scores = evaluate(codec, valid, spectral, cfg.valid_utts)
    print(f"step {step} valid " + " ".join(f"{k} {v:.4f}" for k, v in scores.items()), flush=True)
    return {"step": step, "valid": scores}


def export(ckpt: Path, out: Path) -> None:
    state = torch.load(ckpt / "last.pt", map_location="cpu", weights_only=True)
    codec = Codec(EncoderConfig.from_dict(state["encoder_config"]),
                  VocoderConfig.from_dict(state["vocoder_config"]))
    codec.load_state_dict(state["codec"])
    codec.eval().export(out)
    print(f"step {state['step']}: exported {out}/encoder and {out}/vocoder")


def tokenize(data: Path, encoder_dir: Path, force: bool = False) -> None:
    """Add `tokens` (the encoder's codes of each utterance) and `token_offsets` to every shard."""
    encoder = MelEncoder.load(encoder_dir)
    (data / "tokenizer.json").write_text(json.dumps(
        {"encoder": str(encoder_dir), "levels": list(encoder.cfg.levels),
         "num_codes": encoder.num_codes}) + "\n")
    for shard in tqdm(sorted((data / "shards").glob("*.npz")), desc="tokenize"):
        z = dict(np.load(shard))
        if "tokens" in z and not force:
            continue
        mo = z["mel_offsets"]
        z["tokens"] = np.concatenate([encoder.encode(z["mel"][mo[i]:mo[i + 1]])
                                      for i in range(len(mo) - 1)])
        z["token_offsets"] = mo
        tmp = shard.with_suffix(".tmp.npz")
        np.savez(tmp, **z)
        tmp.rename(shard)


def main(argv: list[str] | None = None) -> None:
    d = TrainConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    for name, value in asdict(d).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, dict):
            ap.add_argument(flag, type=json.loads, default=value)
        else:
            ap.add_argument(flag, type=type(value), default=value)
    ap.add_argument("--export", type=Path, default=None, help="export CKPT/last.pt to this dir")
    ap.add_argument("--tokenize", type=Path, default=None, help="encoder dir: add tokens to the shards")
    ap.add_argument("--force", action="store_true", help="--tokenize: redo shards that have tokens")
    args = vars(ap.parse_args(argv))
    out, enc_dir, force = args.pop("export"), args.pop("tokenize"), args.pop("force")
    cfg = TrainConfig(**args)
    if out is not None:
        export(Path(cfg.ckpt), out)
    elif enc_dir is not None:
        torch.set_num_threads(cfg.threads)
        tokenize(Path(cfg.data), enc_dir, force)
    else:
        train(cfg)


if __name__ == "__main__":
    main()
