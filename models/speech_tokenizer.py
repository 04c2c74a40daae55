"""Speech tokenizer: log-mel frames at 50 Hz quantised by k-means (K = 512).

Frame t covers audio samples [t * HOP, (t + 1) * HOP). The codebook's centroids are log-mel vectors, so
a token sequence can be turned back into a (coarse) spectrogram, which is what the vocoder starts from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SAMPLE_RATE = 22050
HOP = 441  # 50 frames per second
N_FFT = 1764
N_MELS = 80


@dataclass(frozen=True)
class MelConfig:
    sample_rate: int = SAMPLE_RATE
    hop: int = HOP
    n_fft: int = N_FFT
    n_mels: int = N_MELS


class LogMel(torch.nn.Module):
    """audio (B, samples) -> log-mel (B, frames, n_mels) with frames = samples // hop."""

    def __init__(self, cfg: MelConfig = MelConfig()) -> None:
        super().__init__()
        import torchaudio

        self.cfg = cfg
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop, n_mels=cfg.n_mels,
            power=1.0, center=True)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        frames = audio.shape[-1] // self.cfg.hop
        spec = self.mel(audio[..., :frames * self.cfg.hop])  # (B, n_mels, frames + 1)
        return spec[..., :frames].clamp_min(1e-5).log().transpose(-1, -2)  # (B, frames, n_mels)


def kmeans(x: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> torch.Tensor:
    """Plain Lloyd's k-means with k-means++ seeding. x (N, D) -> centroids (k, D)."""
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    centroids = x[torch.randint(0, n, (1,), generator=gen)]
    dist = torch.cdist(x, centroids).squeeze(1) ** 2  # (N,)
    for _ in range(1, k):  # k-means++
        idx = torch.multinomial(dist / dist.sum(), 1, generator=gen)
        centroids = torch.cat([centroids, x[idx]])
        dist = torch.minimum(dist, (torch.cdist(x, x[idx]).squeeze(1)) ** 2)
    for _ in range(iters):
        assign = assign_tokens(x, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).float()
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp_min(1)[:, None])
    return centroids


def assign_tokens(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """x (N, D) -> nearest centroid index (N,)."""
    out = [torch.cdist(x[i:i + chunk], centroids).argmin(-1) for i in range(0, x.shape[0], chunk)]
    return torch.cat(out)


class SpeechTokenizer:
    def __init__(self, centroids: np.ndarray | torch.Tensor, cfg: MelConfig = MelConfig()) -> None:
        self.centroids = torch.as_tensor(np.asarray(centroids), dtype=torch.float32)  # (K, n_mels)
        self.cfg = cfg
        self.logmel = LogMel(cfg)

    @property
    def size(self) -> int:
        return self.centroids.shape[0]

    def encode(self, audio: np.ndarray | torch.Tensor) -> np.ndarray:
        """float audio (samples,) at the sample rate -> tokens (samples // hop,)."""
        with torch.no_grad():
            mel = self.logmel(torch.as_tensor(audio, dtype=torch.float32)[None])[0]
            return assign_tokens(mel, self.centroids).numpy().astype(np.int16)
