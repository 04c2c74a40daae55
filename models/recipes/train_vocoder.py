"""Train the causal Vocos vocoder (models/vocoder.py) on the prepared voice shards, in resumable chunks.

    python -m models.recipes.train_vocoder --minutes 20 [--threads 2] [--data data/voice]
        [--ckpt checkpoints/vocoder] [--out checkpoints/vocoder/model] [--max-hours-audio 2.0]
        [--init-from models/default_voice/vocoder]

Batches are random 1-second crops aligned to frames: tokens[t0:t0 + 50] <-> audio[t0*441:(t0 + 50)*441].
Loss = multi-resolution log-mel L1 + multi-resolution STFT loss (spectral convergence + log magnitude);
no discriminator yet (see `generator_loss`, the place where adversarial terms go). The learning rate
warms up, then follows a cosine over --total-steps, so chunks of --minutes add up to one run.
CKPT/last.pt (model, optimiser, step, RNG states) is written every --save-every-minutes and at the end,
and a run resumes from it. At the end: validation losses, and the model exported with save() to --out.
`--input mel` trains from the shards' true log-mel instead of tokens (a ceiling for the token vocoder).
`--gta-mix P` takes a crop's tokens, with probability P, from DATA/gta/<shard>.npy instead: the speech
LM's teacher-forced predictions for the same frames (`models.recipes.gta_tokens`), so the vocoder learns
to render the LM's kind of tokens as the true audio (shards without that file keep the true tokens).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchaudio
from torch import nn
from tqdm import tqdm

from models.vocoder import CausalVocos, VocoderConfig


@dataclass
class TrainConfig:
    data: str = "data/voice"
    ckpt: str = "checkpoints/vocoder"
    out: str = "checkpoints/vocoder/model"
    minutes: float = 20.0
    threads: int = 1
    device: str = "cpu"
    max_hours_audio: float = 2.0
    input: str = "tokens"  # or "mel"
    batch: int = 16
    crop_frames: int = 50
    lr: float = 7e-4
    warmup: int = 200
    total_steps: int = 2000  # ~1 s/step for the default model at batch 16 on one CPU thread
    weight_decay: float = 0.01
    grad_clip: float = 5.0
    save_every_minutes: float = 2.0
    log_every: int = 100
    valid_utts: int = 32
    valid_frames: int = 250
    gan: bool = False  # hook for a discriminator later; not implemented
    seed: int = 0
    model: dict = field(default_factory=dict)  # VocoderConfig overrides (fresh runs only)
    init_from: str = ""  # fresh runs: start from this exported vocoder dir (e.g. a bundle's)
    gta_mix: float = 0.0  # share of crops whose tokens are the LM's teacher-forced predictions


# ---------------------------------------------------------------- data
@dataclass
class Corpus:
    audio: list[np.ndarray]  # per shard, int16 (samples,)
    tokens: list[np.ndarray | None]  # per shard, int16 (frames,)
    mel: list[np.ndarray | None]  # per shard, float16 (frames, n_mels)
    gta: list[np.ndarray | None]  # per shard, int16 (frames,): the LM's tokens (`gta_tokens`)
    utts: np.ndarray  # (N, 4) int64: shard, first audio sample, first frame, frames

    @property
    def hours(self) -> float:
        return float(self.utts[:, 3].sum()) / 50 / 3600 if len(self.utts) else 0.0


def load_corpus(data: Path, split: str, max_hours: float | None = None, hop: int = 441,
                sample_rate: int = 22050) -> Corpus:
    """Utterances of data/shards/{split}-*.npz in shard order, up to max_hours of audio."""
    budget = math.inf if max_hours is None else max_hours * 3600 * sample_rate
    audio, tokens, mel, gta, utts, total = [], [], [], [], [], 0
    for path in sorted((data / "shards").glob(f"{split}-*.npz")):
        if total >= budget:
            break
        z = np.load(path)
        ao, to = z["audio_offsets"], z["token_offsets" if "token_offsets" in z else "mel_offsets"]
        n = 0
        while n < len(ao) - 1 and total < budget:
            frames = int(to[n + 1] - to[n])
            if ao[n + 1] - ao[n] != frames * hop:
                raise ValueError(f"{path}: utterance {n} has {ao[n + 1] - ao[n]} samples, {frames} frames")
            utts.append((len(audio), ao[n], to[n], frames))
            total += frames * hop
            n += 1
        audio.append(z["audio"][:ao[n]].copy())  # copy: drop the unused tail
        tokens.append(z["tokens"][:to[n]].copy() if "tokens" in z else None)
        mel.append(z["mel"][:to[n]].copy() if "mel" in z else None)
        gta_path = data / "gta" / f"{path.stem}.npy"
        gta.append(np.load(gta_path)[:to[n]] if gta_path.exists() else None)
    return Corpus(audio, tokens, mel, gta, np.asarray(utts, dtype=np.int64).reshape(-1, 4))


def model_input(corpus: Corpus, shard: int, f0: int, frames: int, kind: str) -> np.ndarray:
    """tokens (frames,) int64 ("tokens": true, "gta": the LM's) or log-mel (frames, n_mels) float32
    ("mel") of frames [f0, f0 + frames) of a shard."""
    src = {"tokens": corpus.tokens, "gta": corpus.gta, "mel": corpus.mel}[kind][shard]
    if src is None:
        raise ValueError(f"the shards have no {kind!r} array")
    x = src[f0:f0 + frames]
    return x.astype(np.float32) if kind == "mel" else x.astype(np.int64)


class CropSampler:
    """Random frame-aligned crops; utterances weighted by their number of possible crop positions.
    With gta_mix > 0, that share of token crops takes the LM's tokens where the shard has them."""

    def __init__(self, corpus: Corpus, crop: int, hop: int, kind: str, seed: int,
                 gta_mix: float = 0.0) -> None:
        self.corpus, self.crop, self.hop, self.kind, self.gta_mix = corpus, crop, hop, kind, gta_mix
        starts = corpus.utts[:, 3] - crop + 1  # (N,) number of crop positions
        self.index = np.nonzero(starts > 0)[0]
        if len(self.index) == 0:
            raise ValueError(f"no training utterance has {crop} frames")
        self.weights = torch.as_tensor(starts[self.index], dtype=torch.float64)
        self.gen = torch.Generator().manual_seed(seed)

    def sample(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> inputs (B, crop) long or (B, crop, n_mels) float, audio (B, crop * hop) float in [-1, 1]."""
        picks = torch.multinomial(self.weights, batch, replacement=True, generator=self.gen).tolist()
        xs, ys = [], []
        for p in picks:
            shard, a0, f0, frames = self.corpus.utts[self.index[p]]
            t0 = int(torch.randint(0, int(frames) - self.crop + 1, (1,), generator=self.gen))
            kind = self.kind
            if (self.gta_mix and self.corpus.gta[shard] is not None
                    and float(torch.rand((), generator=self.gen)) < self.gta_mix):
                kind = "gta"
            xs.append(model_input(self.corpus, shard, f0 + t0, self.crop, kind))
            s0 = a0 + t0 * self.hop
            ys.append(self.corpus.audio[shard][s0:s0 + self.crop * self.hop])
        audio = torch.from_numpy(np.stack(ys).astype(np.float32) / 32768.0)  # (B, crop * hop)
        return torch.from_numpy(np.stack(xs)), audio


# ---------------------------------------------------------------- losses
class SpectralLoss(nn.Module):
    """Multi-resolution log-mel L1 + STFT loss (spectral convergence + log-magnitude L1).

    pred, target (B, samples) -> dict of scalars: mel, sc, mag (each averaged over resolutions), total.
    """

    def __init__(self, sample_rate: int = 22050,
                 resolutions: tuple[tuple[int, int, int], ...] = ((512, 128, 64), (1024, 256, 80),
                                                                  (2048, 512, 128))) -> None:
        super().__init__()
        self.resolutions = resolutions  # (n_fft, hop, n_mels)
        for i, (n_fft, _, n_mels) in enumerate(resolutions):
            self.register_buffer(f"window{i}", torch.hann_window(n_fft), persistent=False)
            fb = torchaudio.functional.melscale_fbanks(n_fft // 2 + 1, 0.0, sample_rate / 2, n_mels,
                                                       sample_rate)  # (n_fft // 2 + 1, n_mels)
            self.register_buffer(f"fbank{i}", fb, persistent=False)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        mel = sc = mag = pred.new_zeros(())
        for i, (n_fft, hop, _) in enumerate(self.resolutions):
            window, fb = getattr(self, f"window{i}"), getattr(self, f"fbank{i}")
            m_pred, m_true = (self._magnitude(x, n_fft, hop, window) for x in (pred, target))  # (B, F, n)
            sc = sc + torch.linalg.norm(m_true - m_pred) / torch.linalg.norm(m_true).clamp_min(1e-7)
            mag = mag + (m_pred.log() - m_true.log()).abs().mean()
            mel_pred = (m_pred.transpose(1, 2) @ fb).clamp_min(1e-5).log()  # (B, n, n_mels)
            mel_true = (m_true.transpose(1, 2) @ fb).clamp_min(1e-5).log()
            mel = mel + (mel_pred - mel_true).abs().mean()
        k = len(self.resolutions)
        mel, sc, mag = mel / k, sc / k, mag / k
        return {"mel": mel, "sc": sc, "mag": mag, "total": mel + sc + mag}

    @staticmethod
    def _magnitude(x: torch.Tensor, n_fft: int, hop: int, window: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(x, n_fft, hop, window=window, center=True, return_complex=True)  # (B, F, n)
        return torch.view_as_real(spec).pow(2).sum(-1).clamp_min(1e-7).sqrt()  # finite grad at 0


def generate(model: CausalVocos, inputs: torch.Tensor) -> torch.Tensor:
    """tokens (B, T) long -> audio, or log-mel (B, T, n_mels) float -> audio; audio (B, T * hop)."""
    return model(inputs) if inputs.dtype == torch.long else model.forward_mel(inputs)


def generator_loss(model: CausalVocos, inputs: torch.Tensor, audio: torch.Tensor, spectral: SpectralLoss,
                   discriminator: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Losses of one batch; "total" is what is minimised.

    GAN hook: a discriminator would add its adversarial and feature-matching terms to "total" here, and
    the training loop would then step its own optimiser on (audio, pred.detach()) after the generator.
    """
    pred = generate(model, inputs)
    parts = spectral(pred, audio)
    if discriminator is not None:
        raise NotImplementedError("adversarial training is not implemented yet")
    return parts


# ---------------------------------------------------------------- evaluation
def resynthesize(model: CausalVocos, tokens: np.ndarray | list[int] | torch.Tensor) -> np.ndarray:
    """tokens (T,) -> float32 audio (T * hop,) at the model's sample rate."""
    device = next(model.parameters()).device
    with torch.no_grad():
        x = torch.as_tensor(np.asarray(tokens), dtype=torch.long, device=device).reshape(1, -1)
        return model(x)[0].float().cpu().numpy()


@torch.no_grad()
def evaluate(model: CausalVocos, corpus: Corpus, spectral: SpectralLoss, kind: str, device: str,
             utts: int = 32, max_frames: int = 250) -> dict[str, float]:
    """Mean losses over the first `utts` utterances, each cut to its first `max_frames` frames."""
    sums: dict[str, float] = {}
    rows = corpus.utts[:utts]
    for shard, a0, f0, frames in rows:
        n = int(min(frames, max_frames))
        x = torch.from_numpy(model_input(corpus, shard, f0, n, kind))[None].to(device)
        y = torch.from_numpy(corpus.audio[shard][a0:a0 + n * model.cfg.hop].astype(np.float32) / 32768.0)
        parts = spectral(generate(model, x), y[None].to(device))
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    return {k: v / max(1, len(rows)) for k, v in sums.items()}


# ---------------------------------------------------------------- training
def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine from base down to base / 20 at `total` steps."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def save_checkpoint(path: Path, model: CausalVocos, opt: torch.optim.Optimizer, step: int,
                    sampler: CropSampler, cfg: TrainConfig) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
             "model_config": model.cfg.to_dict(), "train_config": asdict(cfg),
             "rng": {"torch": torch.get_rng_state(), "sampler": sampler.gen.get_state()}}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # never leave a half-written last.pt


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training for cfg.minutes or until cfg.total_steps; returns
    {"start_step", "step", "losses": per-step total losses of this run, "valid": validation losses}."""
    if cfg.gan:
        raise NotImplementedError("--gan: no discriminator yet (see generator_loss)")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    data, ckpt_path = Path(cfg.data), Path(cfg.ckpt) / "last.pt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True) if ckpt_path.exists() else None
    if ckpt is not None:
        model = CausalVocos(VocoderConfig.from_dict(ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    elif cfg.init_from:  # fine-tune: its weights, a fresh optimiser and LR schedule
        model = CausalVocos.load(cfg.init_from).float()
        print(f"initialised from {cfg.init_from}")
    else:
        codebook = data / "codebook.npy"
        model = CausalVocos(VocoderConfig(**cfg.model),
                            np.load(codebook) if codebook.exists() and cfg.input == "tokens" else None)
    model.to(cfg.device).train()
    mc = model.cfg
    spectral = SpectralLoss(mc.sample_rate).to(cfg.device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)

    corpus = load_corpus(data, "train", cfg.max_hours_audio, mc.hop, mc.sample_rate)
    sampler = CropSampler(corpus, cfg.crop_frames, mc.hop, cfg.input, cfg.seed, cfg.gta_mix)
    step = 0
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        step = int(ckpt["step"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        sampler.gen.set_state(ckpt["rng"]["sampler"])
        print(f"resumed {ckpt_path} at step {step}")
    print(f"vocoder {model.num_parameters() / 1e6:.2f}M params, {json.dumps(mc.to_dict())}")
    gta_shards = sum(g is not None for g in corpus.gta) if cfg.gta_mix else 0
    print(f"train: {len(corpus.utts)} utterances, {corpus.hours * 60:.1f} min of audio; input {cfg.input}"
          + (f" ({cfg.gta_mix:.0%} LM tokens, {gta_shards} shards have them)" if cfg.gta_mix else "")
          + f"; batch {cfg.batch} x {cfg.crop_frames} frames")

    start_step, losses = step, []
    t0 = last_save = time.monotonic()
    bar = tqdm(total=cfg.total_steps, initial=step, file=sys.stdout, mininterval=2.0, dynamic_ncols=True)
    while step < cfg.total_steps and time.monotonic() - t0 < cfg.minutes * 60:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.lr, cfg.warmup, cfg.total_steps)
        inputs, audio = sampler.sample(cfg.batch)
        parts = generator_loss(model, inputs.to(cfg.device), audio.to(cfg.device), spectral)
        opt.zero_grad(set_to_none=True)
        parts["total"].backward()
        grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        opt.step()
        step += 1
        losses.append(parts["total"].item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", mel=f"{parts['mel'].item():.3f}", refresh=False)
        if step % cfg.log_every == 0:
            tqdm.write(f"step {step} " + " ".join(f"{k} {v.item():.4f}" for k, v in parts.items())
                       + f" grad {grad_norm:.2f} lr {opt.param_groups[0]['lr']:.2e}", file=sys.stdout)
        if time.monotonic() - last_save >= cfg.save_every_minutes * 60:
            save_checkpoint(ckpt_path, model, opt, step, sampler, cfg)
            last_save = time.monotonic()
    bar.close()
    save_checkpoint(ckpt_path, model, opt, step, sampler, cfg)
    print(f"step {step}: saved {ckpt_path} ({time.monotonic() - t0:.0f} s this run)")

    model.eval()
    valid = load_corpus(data, "valid", None, mc.hop, mc.sample_rate)
    scores = evaluate(model, valid, spectral, cfg.input, cfg.device, cfg.valid_utts, cfg.valid_frames)
    print("valid " + " ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    if cfg.out:
        model.save(cfg.out)
        print(f"exported to {cfg.out}")
    return {"start_step": start_step, "step": step, "losses": losses, "valid": scores}


def main(argv: list[str] | None = None) -> dict:
    d = TrainConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=d.data, help="dir with shards/ and codebook.npy")
    ap.add_argument("--ckpt", default=d.ckpt, help="dir of last.pt (resumed when present)")
    ap.add_argument("--out", default=d.out, help="final export dir (vocoder.safetensors + vocoder.json)")
    ap.add_argument("--minutes", type=float, default=d.minutes, help="wall-time budget of this run")
    ap.add_argument("--threads", type=int, default=d.threads)
    ap.add_argument("--device", default=d.device)
    ap.add_argument("--max-hours-audio", type=float, default=d.max_hours_audio,
                    help="use only the first X hours of the train shards")
    ap.add_argument("--input", choices=["tokens", "mel"], default=d.input)
    ap.add_argument("--batch", type=int, default=d.batch)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--warmup", type=int, default=d.warmup)
    ap.add_argument("--total-steps", type=int, default=d.total_steps, help="length of the LR schedule")
    ap.add_argument("--save-every-minutes", type=float, default=d.save_every_minutes)
    ap.add_argument("--log-every", type=int, default=d.log_every)
    ap.add_argument("--model", type=json.loads, default={}, help='VocoderConfig overrides, e.g. \'{"dim": 256}\'')
    ap.add_argument("--init-from", default=d.init_from,
                    help="a fresh run starts from this exported vocoder (e.g. models/default_voice/vocoder)")
    ap.add_argument("--gta-mix", type=float, default=d.gta_mix,
                    help="share of crops with the LM's teacher-forced tokens (data/gta, gta_tokens)")
    ap.add_argument("--gan", action="store_true", help="adversarial training (not implemented yet)")
    args = ap.parse_args(argv)
    cfg = TrainConfig(**{k.replace("-", "_"): v for k, v in vars(args).items()})
    return train(cfg)


if __name__ == "__main__":
    main()
