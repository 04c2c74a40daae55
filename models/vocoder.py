"""Causal Vocos vocoder: speech tokens (50 Hz k-means ids of log-mel frames) -> 22050 Hz waveform.

    tokens (B, T) -> embedding (B, T, n_mels) -> causal conv -> ConvNeXt blocks (causal depthwise convs)
    -> LayerNorm -> vocos ISTFTHead (complex STFT frames, overlap-add) -> audio (B, T * hop)

Every layer before the head only looks at the current and past frames, so feature frame t depends on
tokens [t - receptive_field_frames + 1, t]. The head's ISTFT ("same" padding, window n_fft = 4 * hop)
places frame k's window on output samples [k*hop - pad, k*hop - pad + n_fft) with
pad = (n_fft - hop) // 2 = 661, so token t changes no sample before t*hop - pad (nor that one: the
periodic Hann window starts at 0): that overlap is the only lookahead (pad samples = 29.98 ms). `StreamingVocoder` emits a sample once no future frame can
reach it, which makes streaming output equal to offline decoding.

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

    def step(self, x: torch.Tensor, ctx: torch.Tensor, lengths: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Streaming: x (B, C_in, n) new inputs, ctx (B, C_in, kernel - 1) the previous inputs (zeros at the
        start) -> (B, C_out, n) outputs, new ctx. Same values as forward() over the whole sequence.
        lengths (B,): row b has only lengths[b] real new inputs (right padding after them): its new
        ctx ends at its last real input, and its outputs past lengths[b] are padding."""
        xin = torch.cat([ctx, x], dim=-1)  # (B, C_in, kernel - 1 + n)
        k = ctx.shape[-1]
        if lengths is None:
            return super().forward(xin), xin[..., xin.shape[-1] - k:]
        idx = lengths[:, None] + torch.arange(k, device=xin.device)  # (B, k): inputs before each end
        return super().forward(xin), xin.gather(2, idx[:, None].expand(-1, xin.shape[1], -1))


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
        return self._mix(x, self.dwconv(x))

    def step(self, x: torch.Tensor, ctx: torch.Tensor, lengths: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Streaming: x (B, dim, n), ctx (B, dim, kernel - 1) -> (B, dim, n), new ctx (lengths: see
        `CausalConv1d.step`)."""
        y, ctx = self.dwconv.step(x, ctx, lengths)
        return self._mix(x, y), ctx

    def _mix(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y = y.transpose(1, 2)  # (B, T, dim)
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

    def features_step(self, mel: torch.Tensor, state: list[torch.Tensor] | None,
                      lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Streaming features(): mel (B, n, n_mels) new frames, state from the previous call (None at the
        start) -> (feats (B, n, dim), state). state holds each causal conv's last kernel - 1 inputs.
        lengths (B,): row b has lengths[b] real frames, then padding (several streams at once)."""
        if state is None:
            k, b = self.cfg.kernel - 1, mel.shape[0]
            state = [mel.new_zeros(b, self.cfg.n_mels, k)] + [mel.new_zeros(b, self.cfg.dim, k)
                                                              for _ in self.blocks]
        new_state = []
        x, ctx = self.conv_in.step(mel.transpose(1, 2), state[0], lengths)  # (B, dim, n)
        new_state.append(ctx)
        x = self.norm_in(x.transpose(1, 2)).transpose(1, 2)  # (B, dim, n)
        for block, ctx in zip(self.blocks, state[1:]):
            x, ctx = block.step(x, ctx, lengths)
            new_state.append(ctx)
        return self.norm_out(x.transpose(1, 2)), new_state  # (B, n, dim)

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


class StreamingVocoder:
    """Chunk-by-chunk decoding of one utterance that reproduces `model(all tokens)`.

    push(tokens) returns the samples that are final once those tokens are known: after T frames that is
    everything before T*hop - lookahead_samples. flush() returns the rest (up to T*hop) and resets.
    The backbone runs only over the new frames (each causal conv keeps its last kernel - 1 inputs, so
    history beyond receptive_field_frames is never needed); the ISTFT head re-runs over the few cached
    feature frames whose windows reach the samples to emit. Cost per push: O(new frames + 3).
    """

    def __init__(self, model: CausalVocos) -> None:
        self.model = model.eval()
        self.cfg = model.cfg
        self.device = next(model.parameters()).device
        self.reset()

    @property
    def lookahead_samples(self) -> int:
        return self.cfg.overlap_samples

    @property
    def lookahead_ms(self) -> float:
        """Latency the ISTFT overlap adds beyond the frame itself: 661 samples = 29.98 ms by default."""
        return 1000.0 * self.lookahead_samples / self.cfg.sample_rate

    @property
    def receptive_field_frames(self) -> int:
        return self.cfg.receptive_field_frames

    def reset(self) -> None:
        self._state: list[torch.Tensor] | None = None  # causal conv contexts
        self._feats = torch.zeros(1, 0, self.cfg.dim, device=self.device)  # (1, F, dim) cached features
        self._fbase = 0  # global frame index of _feats[:, 0]
        self._emitted = 0  # global samples already returned

    @property
    def num_frames(self) -> int:
        return self._fbase + self._feats.shape[1]

    @torch.no_grad()
    def push(self, tokens: list[int] | np.ndarray | torch.Tensor) -> np.ndarray:
        """Append tokens (any 1-D int sequence); return the newly final samples (float32, maybe empty)."""
        return push_many([self], [tokens])[0]

    @torch.no_grad()
    def flush(self) -> np.ndarray:
        """Return the remaining samples up to num_frames * hop, then start a new utterance."""
        out = self._render(self.num_frames * self.cfg.hop)
        self.reset()
        return out

    def _first_frame(self, start: int) -> int:
        """Smallest a such that every frame reaching samples >= start is in [a, T): frame a-1 reaches
        sample a*hop + pad, so a = floor((start - pad - 1) / hop); a = 0 is the offline edge."""
        return max(0, (start - self.lookahead_samples - 1) // self.cfg.hop)

    def _render(self, end: int) -> np.ndarray:
        start, hop = self._emitted, self.cfg.hop
        if end <= start:
            return np.zeros(0, dtype=np.float32)
        a = self._first_frame(start)
        audio = self.model.head(self._feats[:, a - self._fbase:])[0]  # ((T - a)*hop + 1,): i -> a*hop + i
        out = audio[start - a * hop:end - a * hop].float().cpu().numpy()
        self._emitted = end
        keep = self._first_frame(end)  # the next call needs frames from here on
        if keep > self._fbase:
            self._feats = self._feats[:, keep - self._fbase:]
            self._fbase = keep
        return out


@torch.no_grad()
def push_many(streams: list[StreamingVocoder], tokens: list) -> list[np.ndarray]:
    """`stream.push(tokens)` for several streams of one model: one batched backbone pass over all
    their new frames (right-padded to the longest; each stream keeps the conv contexts of its own
    last frame), so the weights are read once per call, not once per stream: on CPU a push of a
    few frames costs mostly that read. Same samples as pushing each alone, to float rounding."""
    toks = [np.asarray(t, dtype=np.int64).reshape(-1) for t in tokens]
    busy = [i for i, t in enumerate(toks) if len(t)]
    if busy:
        model, device = streams[busy[0]].model, streams[busy[0]].device
        cfg = model.cfg
        lengths = [len(toks[i]) for i in busy]
        ids = np.zeros((len(busy), max(lengths)), dtype=np.int64)
        for row, i in enumerate(busy):
            ids[row, :lengths[row]] = toks[i]
        if any(streams[i]._state is None for i in busy):  # a stream's start: zero contexts
            zeros = [torch.zeros(1, c, cfg.kernel - 1, device=device)
                     for c in (cfg.n_mels, *[cfg.dim] * len(model.blocks))]
            for i in busy:
                streams[i]._state = streams[i]._state or zeros
        state = [torch.cat(ctxs) for ctxs in zip(*(streams[i]._state for i in busy))]  # (B, C, k-1)
        lens = torch.tensor(lengths, device=device) if len(busy) > 1 else None  # None: no padding
        feats, state = model.features_step(model.embed(torch.from_numpy(ids).to(device)), state,
                                           lens)  # (B, n, dim)
        for row, i in enumerate(busy):
            s = streams[i]
            s._state = [ctx[row:row + 1] for ctx in state]
            s._feats = torch.cat([s._feats, feats[row:row + 1, :lengths[row]]], dim=1)  # (1, F + n, dim)
    return [s._render(max(0, s.num_frames * s.cfg.hop - s.lookahead_samples)) for s in streams]
