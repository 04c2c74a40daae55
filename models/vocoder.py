"""Causal Vocos vocoder: speech tokens (50 Hz k-means ids of log-mel frames) -> 22050 Hz waveform.

    tokens (B, T) -> embedding (B, T, n_mels) -> causal conv -> ConvNeXt blocks (causal depthwise convs)
    -> LayerNorm -> vocos ISTFTHead (complex STFT frames, overlap-add) -> audio (B, T * hop)

Every layer before the head only looks at the current and past frames, so feature frame t depends on
tokens [t - receptive_field_frames + 1, t]. The head's ISTFT ("same" padding, window n_fft = 4 * hop)
places frame k's window on output samples [k*hop - pad, k*hop - pad + n_fft) with
pad = (n_fft - hop) // 2 = 661, so token t changes no sample before t*hop - pad (nor that one: the
periodic Hann window starts at 0): that overlap is the only lookahead (pad samples = 29.98 ms).
`models.streaming_vocoder` emits a sample once no future frame can reach it, which makes streaming
output equal to offline decoding.

What `vocos.heads.ISTFTHead(dim, n_fft, hop, padding="same")` returns for T frames: T*hop + 1 samples
(fold length (T-1)*hop + n_fft, minus pad on both sides); sample j is the overlap-add of frames
ceil((j - n_fft + 1 + pad) / hop) .. floor((j + pad) / hop), normalised by the summed squared window of
those frames that exist. The extra last sample (j = T*hop) is dropped here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from vocos.heads import ISTFTHead

WEIGHTS_FILE = "vocoder.safetensors"
CONFIG_FILE = "vocoder.json"


@dataclass(frozen=True)
class VocoderConfig:
    num_tokens: int = 512
    n_mels: int = 80
    dim: int = 384
    intermediate: int = 1152
    num_blocks: int = 8
    kernel: int = 7  # kernel of the input conv and of every depthwise conv
    n_fft: int = 1764
    hop: int = 441
    sample_rate: int = 22050

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> VocoderConfig:
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})

    @property
    def overlap_samples(self) -> int:
        """Samples before frame t's own span that frame t still changes (the ISTFT's "same" padding)."""
        return (self.n_fft - self.hop) // 2

    @property
    def receptive_field_frames(self) -> int:
        """Feature frame t depends on tokens [t - receptive_field_frames + 1, t]."""
        return 1 + (self.kernel - 1) * (1 + self.num_blocks)


class CausalConv1d(nn.Conv1d):
    """Conv1d padded on the left only: x (B, C_in, T) -> (B, C_out, T); output t sees inputs <= t."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.kernel_size[0] - 1, 0)))


class CausalConvNeXtBlock(nn.Module):
    """x (B, dim, T) -> x + gamma * MLP(LayerNorm(causal depthwise conv(x))), same shape."""

    def __init__(self, dim: int, intermediate: int, kernel: int, layer_scale: float) -> None:
        super().__init__()
        self.dwconv = CausalConv1d(dim, dim, kernel, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, intermediate)
        self.pwconv2 = nn.Linear(intermediate, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).transpose(1, 2)  # (B, T, dim)
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y)))) * self.gamma  # (B, T, dim)
        return x + y.transpose(1, 2)  # (B, dim, T)


class CausalVocos(nn.Module):
    def __init__(self, cfg: VocoderConfig = VocoderConfig(),
                 centroids: np.ndarray | torch.Tensor | None = None) -> None:
        """centroids: optional (num_tokens, n_mels) k-means log-mel centroids to initialise the embedding."""
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.num_tokens, cfg.n_mels)
        self.conv_in = CausalConv1d(cfg.n_mels, cfg.dim, cfg.kernel)
        self.norm_in = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.blocks = nn.ModuleList(
            CausalConvNeXtBlock(cfg.dim, cfg.intermediate, cfg.kernel, 1.0 / cfg.num_blocks)
            for _ in range(cfg.num_blocks))
        self.norm_out = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.head = ISTFTHead(cfg.dim, cfg.n_fft, cfg.hop, padding="same")
        self.apply(self._init)
        if centroids is not None:
            c = torch.as_tensor(np.asarray(centroids), dtype=torch.float32)
            if c.shape != (cfg.num_tokens, cfg.n_mels):
                raise ValueError(f"centroids {tuple(c.shape)} != ({cfg.num_tokens}, {cfg.n_mels})")
            with torch.no_grad():
                self.embed.weight.copy_(c)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv1d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    @property
    def receptive_field_frames(self) -> int:
        return self.cfg.receptive_field_frames

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- network ----
    def features(self, mel: torch.Tensor) -> torch.Tensor:
        """mel (B, T, n_mels) -> backbone features (B, T, dim); frame t sees mel frames <= t only."""
        x = self.conv_in(mel.transpose(1, 2))  # (B, dim, T)
        x = self.norm_in(x.transpose(1, 2)).transpose(1, 2)  # (B, dim, T)
        for block in self.blocks:
            x = block(x)
        return self.norm_out(x.transpose(1, 2))  # (B, T, dim)

    def head_audio(self, feats: torch.Tensor) -> torch.Tensor:
        """feats (B, T, dim) -> audio (B, T * hop) (the head's extra last sample dropped)."""
        audio = self.head(feats)  # (B, T * hop + 1)
        n = feats.shape[1] * self.cfg.hop
        if audio.shape[-1] < n:  # not the case for vocos 0.1 "same" padding; kept for safety
            audio = F.pad(audio, (0, n - audio.shape[-1]))
        return audio[..., :n]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) long -> audio (B, T * hop) float."""
        return self.head_audio(self.features(self.embed(tokens)))  # embed: (B, T, n_mels)

    def forward_mel(self, mel: torch.Tensor) -> torch.Tensor:
        """True log-mel (B, T, n_mels) (models.speech_tokenizer.LogMel) -> audio (B, T * hop)."""
        return self.head_audio(self.features(mel))

    # ---- save / load ----
    def save(self, path_dir: str | Path) -> None:
        path = Path(path_dir)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS_FILE))
        (path / CONFIG_FILE).write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path_dir: str | Path, device: str | torch.device = "cpu") -> CausalVocos:
        path = Path(path_dir)
        cfg = VocoderConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))
        model = cls(cfg)
        model.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
        return model.to(device).eval()
