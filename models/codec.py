"""Learned speech tokenizer: log-mel frames (50 Hz) -> one FSQ code per frame, trained with the vocoder.

    mel (B, T, n_mels) -> MelEncoder (non-causal ConvNeXt) -> (B, T, D) in (-1, 1)^D
    -> FSQ: each dimension rounded to one of levels[d] values -> code = mixed-radix index (B, T)

Finite scalar quantisation (Mentzer et al., 2023): no codebook to learn or collapse; gradients pass
through the rounding unchanged (straight-through). The decoder side is the vocoder's own embedding:
`FSQ.values(codes)` (B, T, D) -> a linear map to the vocoder's n_mels input. For serving, that map is
folded into an ordinary embedding table (num_codes, n_mels) (`fold_into_vocoder`), so a bundle's
vocoder stays a plain `CausalVocos` over token ids. Only the encoder needs the whole utterance; it
runs when the corpus is tokenised, never at serving time.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.vocoder import CausalVocos, VocoderConfig

ENCODER_FILE = "encoder.safetensors"
ENCODER_CONFIG = "encoder.json"


class FSQ(nn.Module):
    """z (..., D) unbounded -> quantised values (..., D) in [-1, 1] and codes (...,) in [0, num_codes).

    Dimension d is bounded by tanh to levels[d] integer steps (-L//2 .. (L-1)//2 after rounding),
    divided by L//2; the code is the mixed-radix number of the steps (digit d = step + L//2)."""

    def __init__(self, levels: tuple[int, ...]) -> None:
        super().__init__()
        self.levels = tuple(int(v) for v in levels)
        lv = torch.tensor(self.levels, dtype=torch.float32)
        self.register_buffer("_half_l", (lv - 1) * (1 - 1e-3) / 2, persistent=False)
        self.register_buffer("_offset", (lv % 2 == 0).float() * 0.5, persistent=False)
        self.register_buffer("_half_width", torch.floor(lv / 2), persistent=False)
        self.register_buffer("_levels", lv.long(), persistent=False)
        self.register_buffer("_basis", torch.tensor(np.cumprod([1, *self.levels[:-1]]), dtype=torch.long),
                             persistent=False)

    @property
    def num_codes(self) -> int:
        return int(np.prod(self.levels))

    @property
    def dim(self) -> int:
        return len(self.levels)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift = torch.atanh(self._offset / self._half_l)
        bounded = torch.tanh(z + shift) * self._half_l - self._offset  # (..., D)
        steps = bounded + (torch.round(bounded) - bounded).detach()  # straight-through rounding
        digits = (torch.round(bounded).long() + self._half_width.long()).clamp(min=0)  # (..., D)
        digits = torch.minimum(digits, self._levels - 1)
        codes = (digits * self._basis).sum(-1)  # (...,)
        return steps / self._half_width, codes

    def values(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (...,) long -> the quantised values (..., D) that `forward` returns for them."""
        digits = (codes[..., None] // self._basis) % self._levels  # (..., D)
        return (digits.float() - self._half_width) / self._half_width


@dataclass(frozen=True)
class EncoderConfig:
    n_mels: int = 80
    dim: int = 256
    intermediate: int = 768
    num_blocks: int = 4
    kernel: int = 7
    levels: tuple[int, ...] = (7, 5, 5, 5, 5)  # 4375 codes

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> EncoderConfig:
        kw = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        if "levels" in kw:
            kw["levels"] = tuple(kw["levels"])
        return cls(**kw)


class _Block(nn.Module):
    """x (B, dim, T) -> x + MLP(LayerNorm(depthwise conv(x))) (centred, non-causal), same shape."""

    def __init__(self, dim: int, intermediate: int, kernel: int, layer_scale: float) -> None:
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, intermediate), nn.GELU(), nn.Linear(intermediate, dim))
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).transpose(1, 2)  # (B, T, dim)
        return x + (self.mlp(self.norm(y)) * self.gamma).transpose(1, 2)


class MelEncoder(nn.Module):
    """mel (B, T, n_mels) -> (values (B, T, D), codes (B, T)); frame t sees its neighbours on both
    sides (num_blocks * (kernel // 2) + kernel // 2 frames each way)."""

    def __init__(self, cfg: EncoderConfig = EncoderConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.conv_in = nn.Conv1d(cfg.n_mels, cfg.dim, cfg.kernel, padding=cfg.kernel // 2)
        self.blocks = nn.ModuleList(_Block(cfg.dim, cfg.intermediate, cfg.kernel, 1.0 / cfg.num_blocks)
                                    for _ in range(cfg.num_blocks))
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.proj = nn.Linear(cfg.dim, len(cfg.levels))
        self.fsq = FSQ(cfg.levels)

    @property
    def num_codes(self) -> int:
        return self.fsq.num_codes

    def forward(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv_in(mel.transpose(1, 2))  # (B, dim, T)
        for block in self.blocks:
            x = block(x)
        z = self.proj(self.norm(x.transpose(1, 2)))  # (B, T, D)
        return self.fsq(z)

    @torch.no_grad()
    def encode(self, mel: np.ndarray | torch.Tensor) -> np.ndarray:
        """One utterance's log-mel (T, n_mels) -> codes (T,) int16 (or int32 past 32767 codes)."""
        x = torch.as_tensor(np.asarray(mel, dtype=np.float32))[None]
        codes = self(x.to(self.proj.weight.device))[1][0].cpu().numpy()
        return codes.astype(np.int16 if self.num_codes <= 32767 else np.int32)

    def save(self, path_dir: str | Path) -> None:
        path = Path(path_dir)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(path / ENCODER_FILE))
        (path / ENCODER_CONFIG).write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path_dir: str | Path) -> MelEncoder:
        path = Path(path_dir)
        model = cls(EncoderConfig.from_dict(json.loads((path / ENCODER_CONFIG).read_text())))
        model.load_state_dict(load_file(str(path / ENCODER_FILE)))
        return model.eval()


class CodeEmbedding(nn.Module):
    """The vocoder's input for FSQ codes while training: values (B, T, D) -> (B, T, n_mels)."""

    def __init__(self, fsq: FSQ, n_mels: int) -> None:
        super().__init__()
        self.fsq = fsq
        self.proj = nn.Linear(fsq.dim, n_mels)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return self.proj(values)

    @torch.no_grad()
    def table(self) -> torch.Tensor:
        """(num_codes, n_mels): the embedding of every code, for an ordinary lookup at serving time."""
        codes = torch.arange(self.fsq.num_codes, device=self.proj.weight.device)
        return self.proj(self.fsq.values(codes))


def fold_into_vocoder(vocoder: CausalVocos, embedding: CodeEmbedding) -> CausalVocos:
    """A plain `CausalVocos` over code ids whose embedding table is `embedding.table()`."""
    table = embedding.table()
    cfg: VocoderConfig = replace(vocoder.cfg, num_tokens=table.shape[0])
    out = CausalVocos(cfg)
    state = {k: v for k, v in vocoder.state_dict().items() if not k.startswith("embed.")}
    out.load_state_dict({**state, "embed.weight": table.cpu()}, strict=True)
    return out.eval()
