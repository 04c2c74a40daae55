"""SNAC (hubertsiuzdak/snac, MIT) as a streaming speech decoder: codes in, 24 kHz audio out.

SNAC quantises a latent sequence (hop 512 samples) with codebooks at different strides; the 24 kHz
model has vq_strides [4, 2, 1]: one *frame* is 4 latent steps = 2048 samples (85.3 ms), carried by
1 + 2 + 4 = 7 codes. Here a frame is always written in the codec's own order,

    (c0[f], c1[2f], c1[2f+1], c2[4f], c2[4f+1], c2[4f+2], c2[4f+3])   # (7,) codes of frame f

(a speech LM's token order is its layout's business: `models.voices.orpheus`).

The decoder (`snac.layers.Decoder`) is non-causal: convolutions with "same" padding and transposed
convolutions, so an output sample depends on latent steps on both sides: up to `context_latents`
steps before it and `receptive_ahead` after it (computed from the modules, checked by a test).
Streaming therefore decodes windows: to emit latent steps [a, b) it decodes [a - C, b + A) (clipped
to what exists) and keeps the middle; the samples kept never see a window edge, so they equal one
offline decode of everything, to float rounding. The fixed lookahead is A latent steps
(`lookahead_ms`: 10 steps = 213 ms for the 24 kHz model); `flush` decodes the tail up to the true end, where offline decoding has the same edge. Every
frame is emitted: the first from the stream's start, the last at flush (total 2048 x frames samples).

Noise: SNAC's `NoiseBlock` adds `randn * linear(x)` with fresh noise per call, so two decodes of the
same codes differ, and windows would not join. Here the noise is a fixed function of position (per
noise block, i.i.d. normal values drawn from `noise_seed` in blocks of 4096 positions): the same
distribution as SNAC's, reproducible, and the same for a window as for the whole. `noise="off"` skips it.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors")
_NOISE_BLOCK = 4096  # positions per seeded noise block


def _snac():
    try:
        import snac
    except ImportError as exc:  # a dependency of the project; a clear line if it is missing
        raise ValueError("SNAC codecs need the `snac` package (pip install snac)") from exc
    return snac


class SnacCodec:
    """A loaded SNAC model, decoding frames (N, 7 for the 24 kHz model) to audio offline or as
    streams (`stream`, `push_many`)."""

    def __init__(self, model: nn.Module, noise: str = "positional", noise_seed: int = 0,
                 lookahead_latents: int | None = None) -> None:
        """noise: "positional" (seeded by position) or "off". lookahead_latents: latent steps decoded
        beyond the last emitted one (default: the decoder's receptive field, exact streaming; less
        lowers latency and makes streamed audio differ from offline, measured in the tests)."""
        if noise not in ("positional", "off"):
            raise ValueError(f"noise must be 'positional' or 'off', not {noise!r}")
        self.model = model.eval()
        self.noise, self.noise_seed = noise, noise_seed
        self.device = next(model.parameters()).device
        strides = list(model.vq_strides)
        if any(strides[0] % s for s in strides):
            raise ValueError(f"vq_strides {strides}: each must divide the first")
        self.latents_per_frame = strides[0]
        self.codes_per_frame = sum(strides[0] // s for s in strides)
        self.sample_rate = int(model.sampling_rate)
        self.hop = int(np.prod(model.decoder_rates))  # samples per latent step
        self.samples_per_frame = self.hop * self.latents_per_frame
        self.codebook_size = int(model.codebook_size)
        self.context_latents, self.receptive_ahead = receptive_latents(model.decoder)
        self.lookahead_latents = (self.receptive_ahead if lookahead_latents is None
                                  else int(lookahead_latents))
        self._noise_cache: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()

    @staticmethod
    def check_dir(path: str | Path) -> tuple[dict, Path]:
        """A SNAC directory's config and weights file; ValueError naming what is missing."""
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"codec {path} is not a directory")
        if not (path / CONFIG_FILE).exists():
            raise ValueError(f"codec {path} lacks {CONFIG_FILE} (SNAC's constructor arguments)")
        weights = next((path / f for f in WEIGHT_FILES if (path / f).exists()), None)
        if weights is None:
            raise ValueError(f"codec {path} lacks its weights ({' or '.join(WEIGHT_FILES)})")
        config = json.loads((path / CONFIG_FILE).read_text())
        if "vq_strides" not in config:
            raise ValueError(f"{path / CONFIG_FILE} is not a SNAC config (no vq_strides)")
        return config, weights

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", **kwargs) -> SnacCodec:
        """A SNAC directory as published (`config.json`: SNAC's constructor arguments, and
        `pytorch_model.bin` or `model.safetensors`). ValueError naming what is missing."""
        config, weights = cls.check_dir(path)
        model = _snac().SNAC(**config)
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(weights))
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        return cls(model.to(device), **kwargs)

    @property
    def lookahead_samples(self) -> int:
        return self.lookahead_latents * self.hop

    @property
    def lookahead_ms(self) -> float:
        """Audio that must be known beyond the last emitted sample: 10 latent steps = 213 ms at
        24 kHz with the exact (default) lookahead."""
        return 1000.0 * self.lookahead_samples / self.sample_rate

    # --- codes -> latents -> audio -------------------------------------------------------------
    @torch.no_grad()
    def latents(self, frames: np.ndarray) -> torch.Tensor:
        """frames (N, codes_per_frame) in the codec's order -> the quantizer's latent
        (1, latent_dim, N * latents_per_frame). Pointwise in time: frames can be converted alone."""
        frames = np.asarray(frames, dtype=np.int64).reshape(-1, self.codes_per_frame)
        if frames.size and not (0 <= frames.min() and frames.max() < self.codebook_size):
            raise ValueError(f"codes outside [0, {self.codebook_size})")
        codes, col = [], 0
        for s in self.model.vq_strides:
            per = self.latents_per_frame // s  # codes of this codebook per frame
            codes.append(torch.from_numpy(frames[:, col:col + per].reshape(1, -1)).to(self.device))
            col += per
        return self.model.quantizer.from_codes(codes)

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor, starts: list[int]) -> torch.Tensor:
        """z (B, latent_dim, W): windows whose first latent step is starts[b] of its utterance (the
        noise depends on it) -> audio (B, W * hop). SNAC's decoder, module by module, with the
        noise blocks fed positional noise."""
        layers = _snac().layers
        x, rate = z, 1  # rate: the current layer's steps per latent step
        for layer in self.model.decoder.model:
            for sub in (layer.block if isinstance(layer, layers.DecoderBlock) else [layer]):
                if isinstance(sub, layers.NoiseBlock):
                    if self.noise == "positional":
                        x = x + self._noise(starts, rate, x) * sub.linear(x)
                    continue
                x = sub(x)
                if isinstance(sub, nn.ConvTranspose1d):
                    rate *= sub.stride[0]
        return x[:, 0]  # (B, W * hop)

    def decode(self, frames: np.ndarray) -> np.ndarray:
        """All frames of one utterance at once (offline) -> float32 audio (N * samples_per_frame,)."""
        frames = np.asarray(frames, dtype=np.int64).reshape(-1, self.codes_per_frame)
        if not len(frames):
            return np.zeros(0, np.float32)
        return self.decode_latents(self.latents(frames), [0])[0].float().cpu().numpy()

    def stream(self) -> SnacStream:
        return SnacStream(self)

    # --- positional noise ----------------------------------------------------------------------
    def _noise(self, starts: list[int], rate: int, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, T) noise for x (B, C, T) at `rate` steps per latent step, row b starting at latent
        step starts[b]."""
        T = x.shape[-1]
        rows = [self._noise_at(rate, s * rate, T) for s in starts]
        return torch.stack(rows)[:, None].to(device=x.device, dtype=x.dtype)

    def _noise_at(self, rate: int, start: int, length: int) -> torch.Tensor:
        first, last = start // _NOISE_BLOCK, (start + length - 1) // _NOISE_BLOCK
        blocks = [self._noise_block(rate, i) for i in range(first, last + 1)]
        joined = torch.cat(blocks)
        return joined[start - first * _NOISE_BLOCK:start - first * _NOISE_BLOCK + length]

    def _noise_block(self, rate: int, index: int) -> torch.Tensor:
        key = (rate, index)
        if key not in self._noise_cache:
            # torch's CPU generator keeps 32 bits of a seed: mix the three into 32 bits
            seed = np.random.SeedSequence([self.noise_seed, rate, index]).generate_state(1)[0]
            gen = torch.Generator().manual_seed(int(seed))
            self._noise_cache[key] = torch.randn(_NOISE_BLOCK, generator=gen)
            if len(self._noise_cache) > 512:
                self._noise_cache.popitem(last=False)
        self._noise_cache.move_to_end(key)
        return self._noise_cache[key]


def receptive_latents(decoder: nn.Module) -> tuple[int, int]:
    """How many latent steps before and after itself an output sample of SNAC's decoder can see,
    rounded up: a "same" convolution reaches (kernel - 1) * dilation / 2 of its own steps either
    way; a transposed one (output j sees inputs i with 0 <= j + padding - i * stride < kernel)
    (kernel - 1 - padding) / stride input steps back and padding / stride ahead. Summed in latent
    steps (a layer's step is 1 / rate of a latent step)."""
    back = ahead = 0.0
    rate = 1
    for module in decoder.modules():
        if isinstance(module, nn.ConvTranspose1d):
            k, s, p = module.kernel_size[0], module.stride[0], module.padding[0]
            back += (k - 1 - p) / s / rate
            ahead += p / s / rate
            rate *= s
        elif isinstance(module, nn.Conv1d):
            reach = (module.kernel_size[0] - 1) * module.dilation[0] / 2 / rate
            back += reach
            ahead += reach
    return math.ceil(back), math.ceil(ahead)


class SnacStream:
    """One utterance decoded as its frames arrive. `push(frames)` returns the samples that are final
    (those at least `lookahead_latents` latent steps before the end of what is known); `flush()`
    returns the rest up to 2048 x frames and resets. Joined, they equal `codec.decode(all frames)`
    to float rounding with the default lookahead."""

    def __init__(self, codec: SnacCodec) -> None:
        self.codec = codec
        self.reset()

    def reset(self) -> None:
        self._z: torch.Tensor | None = None  # (1, D, L - base) latents kept for the next windows
        self._base = 0  # latent step of _z[..., 0]
        self._length = 0  # latent steps known
        self._emitted = 0  # latent steps whose samples were returned

    @property
    def num_frames(self) -> int:
        return self._length // self.codec.latents_per_frame

    def push(self, frames) -> np.ndarray:
        return push_many([self], [frames])[0]

    def flush(self) -> np.ndarray:
        """The remaining samples up to the end (decoded with the true right edge), then reset."""
        out = _render([self], [self._length])[0]
        self.reset()
        return out

    def _append(self, frames) -> None:
        frames = np.asarray(frames, dtype=np.int64).reshape(-1, self.codec.codes_per_frame)
        if not len(frames):
            return
        z = self.codec.latents(frames)  # (1, D, n * latents_per_frame)
        self._z = z if self._z is None else torch.cat([self._z, z], dim=-1)
        self._length += z.shape[-1]


def push_many(streams: list[SnacStream], frames: list) -> list[np.ndarray]:
    """`stream.push(frames)` for several streams of one codec: their windows are decoded in one
    batched pass (right-padded; the samples kept never see the padding)."""
    for s, f in zip(streams, frames):
        s._append(f)
    return _render(streams, [max(s._emitted, s._length - s.codec.lookahead_latents)
                             for s in streams])


def _render(streams: list[SnacStream], ends: list[int]) -> list[np.ndarray]:
    """Emit latent steps [emitted, ends[b]) of each stream: decode the window that reaches C steps
    before and A after them (clipped to the stream), keep the middle."""
    out = [np.zeros(0, np.float32) for _ in streams]
    busy = [b for b, (s, e) in enumerate(zip(streams, ends)) if e > s._emitted]
    if not busy:
        return out
    codec = streams[busy[0]].codec
    C, A, hop = codec.context_latents, codec.receptive_ahead, codec.hop
    windows = []  # (first latent step, latents (D, W))
    for b in busy:
        s = streams[b]
        lo = max(s._base, s._emitted - C)
        hi = min(s._length, ends[b] + A)
        windows.append((lo, s._z[0, :, lo - s._base:hi - s._base]))
    width = max(w.shape[-1] for _, w in windows)
    z = torch.zeros(len(windows), windows[0][1].shape[0], width, device=codec.device,
                    dtype=windows[0][1].dtype)
    for row, (_, w) in enumerate(windows):
        z[row, :, :w.shape[-1]] = w
    audio = codec.decode_latents(z, [lo for lo, _ in windows])  # (B, width * hop)
    for row, b in enumerate(busy):
        s, lo = streams[b], windows[row][0]
        out[b] = audio[row, (s._emitted - lo) * hop:(ends[b] - lo) * hop].float().cpu().numpy()
        s._emitted = ends[b]
        keep = max(s._base, s._emitted - C)  # the next window starts no earlier than this
        if s._z is not None and keep > s._base:
            s._z = s._z[..., keep - s._base:]
            s._base = keep
    return out
