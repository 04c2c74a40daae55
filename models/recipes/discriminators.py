"""Discriminators for adversarial vocoder training (training only; never loaded for serving).

- `MultiPeriodDiscriminator` (HiFi-GAN, Kong et al. 2020): the waveform folded into (T / p, p) for
  periods p = 2, 3, 5, 7, 11, 2-D convs along time: judges periodic structure (pitch, voicing).
- `MultiResolutionDiscriminator` (UnivNet / Vocos): 2-D convs over STFT magnitudes at three
  resolutions: judges spectral detail (noise, bursts, harmonics).
Channel widths are smaller than the papers' so that a step fits a CPU budget.

Each returns, per sub-discriminator, (logits, feature maps); losses are least-squares GAN
(`d_loss`, `g_loss`) and L1 feature matching (`fm_loss`), as in HiFi-GAN and Vocos.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

Outputs = list[tuple[torch.Tensor, list[torch.Tensor]]]


class _PeriodDiscriminator(nn.Module):
    def __init__(self, period: int, channels: tuple[int, ...] = (16, 64, 128, 256)) -> None:
        super().__init__()
        self.period = period
        chans = (1, *channels)
        self.convs = nn.ModuleList(
            weight_norm(nn.Conv2d(chans[i], chans[i + 1], (5, 1), (3, 1), padding=(2, 0)))
            for i in range(len(channels)))
        self.last = weight_norm(nn.Conv2d(channels[-1], channels[-1], (5, 1), 1, padding=(2, 0)))
        self.out = weight_norm(nn.Conv2d(channels[-1], 1, (3, 1), 1, padding=(1, 0)))

    def forward(self, audio: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """audio (B, samples) -> logits (B, n), feature maps."""
        b, t = audio.shape
        if t % self.period:
            audio = F.pad(audio, (0, self.period - t % self.period), mode="reflect")
        x = audio.view(b, 1, -1, self.period)  # (B, 1, T / p, p)
        feats = []
        for conv in (*self.convs, self.last):
            x = F.leaky_relu(conv(x), 0.1)
            feats.append(x)
        x = self.out(x)
        feats.append(x)
        return x.flatten(1), feats


class MultiPeriodDiscriminator(nn.Module):
    def __init__(self, periods: tuple[int, ...] = (2, 3, 5, 7, 11)) -> None:
        super().__init__()
        self.subs = nn.ModuleList(_PeriodDiscriminator(p) for p in periods)

    def forward(self, audio: torch.Tensor) -> Outputs:
        return [d(audio) for d in self.subs]


class _ResolutionDiscriminator(nn.Module):
    def __init__(self, n_fft: int, hop: int, channels: int = 32) -> None:
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.convs = nn.ModuleList([
            weight_norm(nn.Conv2d(1, channels, (7, 5), (2, 2), padding=(3, 2))),
            weight_norm(nn.Conv2d(channels, channels, (5, 3), (2, 1), padding=(2, 1))),
            weight_norm(nn.Conv2d(channels, channels, (5, 3), (2, 2), padding=(2, 1))),
            weight_norm(nn.Conv2d(channels, channels, 3, (2, 1), padding=1)),
            weight_norm(nn.Conv2d(channels, channels, 3, (2, 2), padding=1)),
        ])
        self.out = weight_norm(nn.Conv2d(channels, 1, 3, padding=1))

    def forward(self, audio: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """audio (B, samples) -> logits (B, n), feature maps."""
        spec = torch.stft(audio, self.n_fft, self.hop, window=self.window, center=True,
                          return_complex=True).abs()  # (B, F, frames)
        x = spec.clamp_min(1e-5).log()[:, None]  # (B, 1, F, frames)
        feats = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.1)
            feats.append(x)
        x = self.out(x)
        feats.append(x)
        return x.flatten(1), feats


class MultiResolutionDiscriminator(nn.Module):
    def __init__(self, resolutions: tuple[tuple[int, int], ...] = ((512, 128), (1024, 256),
                                                                    (2048, 512))) -> None:
        super().__init__()
        self.subs = nn.ModuleList(_ResolutionDiscriminator(n, h) for n, h in resolutions)

    def forward(self, audio: torch.Tensor) -> Outputs:
        return [d(audio) for d in self.subs]


def d_loss(real: Outputs, fake: Outputs) -> torch.Tensor:
    """Least squares: real logits towards 1, generated towards 0 (mean over sub-discriminators)."""
    return sum(((1 - r) ** 2).mean() + (f ** 2).mean() for (r, _), (f, _) in zip(real, fake)) / len(real)


def g_loss(fake: Outputs) -> torch.Tensor:
    return sum(((1 - f) ** 2).mean() for f, _ in fake) / len(fake)


def fm_loss(real: Outputs, fake: Outputs) -> torch.Tensor:
    """L1 between the feature maps of real and generated audio (real ones detached)."""
    total, n = 0.0, 0
    for (_, fr), (_, ff) in zip(real, fake):
        for a, b in zip(fr, ff):
            total = total + (a.detach() - b).abs().mean()
            n += 1
    return total / max(1, n)
