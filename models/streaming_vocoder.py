"""Streaming `CausalVocos`: chunk-by-chunk decoding of many utterances that reproduces offline decoding.

Every layer before the ISTFT head only looks at the current and past frames (feature frame t depends
on tokens [t - receptive_field_frames + 1, t]), so each causal conv keeps its last kernel - 1 inputs
and the backbone runs over the new frames only. The head's ISTFT ("same" padding, window n_fft, hop)
places frame k's windowed inverse FFT on fold positions [k*hop, k*hop + n_fft); output sample j is
fold position j + pad (pad = (n_fft - hop) // 2), divided by the summed squared window of the frames
covering it. After T frames every position below T*hop has all its frames, i.e. every sample below
T*hop - pad is final: that overlap (pad samples, 29.98 ms for the shipped voice) is the only lookahead.

One pass (`push_many`) vocodes the new frames of many streams together, with no padding: their
frames are packed as rows (R, C) through every per-frame op (the linears, norms, the head's FFT);
each causal conv reads its windows of k inputs by index from [the streams' contexts; the packed
rows], so a stream's first new frame sees its own previous inputs. Each frame's windowed inverse FFT
is computed once, when the frame arrives, and overlap-added into its stream's pending tail (the
r - 1 blocks of hop samples that later frames still reach, r = ceil(n_fft / hop)); a block is
emitted once it is complete. On the CPU the linears use oneDNN with weights reordered once
(`Prepared`): a pass of a few frames costs mostly reading the weights, which the default GEMM reads
several times per call (it packs them each time).

Cost per pass: one read of the weights, plus O(new frames) for all streams together.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.vocoder import CausalConvNeXtBlock, CausalVocos


class Linear:
    """y = x @ W.T + b (optionally GELU'd) for rows x (R, in): oneDNN with a weight reordered once on
    the CPU (the default GEMM re-packs W on every call, which dominates at a few rows), torch's
    F.linear elsewhere. The same values as `nn.Linear` to float rounding."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        weight, self.bias = weight.detach().contiguous(), bias.detach().contiguous()
        self.weight, self.packed = weight, None
        if (weight.device.type == "cpu" and weight.dtype == torch.float32
                and torch.backends.mkldnn.is_available()):
            self.weight, self.packed = None, torch.ops.mkldnn._reorder_linear_weight(weight, None)

    def __call__(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias,
                                                      "gelu" if gelu else "none", [], "none")
        y = F.linear(x, self.weight, self.bias)
        return F.gelu(y) if gelu else y


@dataclass(frozen=True)
class Block:
    """A ConvNeXt block for rows: x + pw2(gelu(pw1(norm(depthwise causal conv(x))))), gamma folded
    into pw2."""

    dw: torch.Tensor  # (k, dim): the depthwise conv's taps, oldest input first
    dw_bias: torch.Tensor  # (dim,)
    norm: nn.LayerNorm
    pw1: Linear
    pw2: Linear

    @classmethod
    def of(cls, block: CausalConvNeXtBlock) -> Block:
        gamma = block.gamma.detach()  # (dim,)
        return cls(block.dwconv.weight.detach()[:, 0, :].t().contiguous(),
                   block.dwconv.bias.detach(), block.norm,
                   Linear(block.pwconv1.weight, block.pwconv1.bias),
                   Linear(block.pwconv2.weight * gamma[:, None], block.pwconv2.bias * gamma))


class Prepared:
    """A model's weights laid out for the streaming pass, built once per model (`prepared`).

    conv_in (out, in, k) becomes one linear over a window's k inputs flattened (k * in); each block
    a `Block`. Overlap-add tables: `window` (n_fft,); `envelope[a, b]` (hop,) the summed squared
    window of frame offsets a..b within a block of hop fold positions (block m gets the frames
    m - i, i in 0..r-1, that exist)."""

    def __init__(self, model: CausalVocos) -> None:
        cfg = model.cfg
        self.cfg, self.k, self.device = cfg, cfg.kernel, model.embed.weight.device
        self.r = -(-cfg.n_fft // cfg.hop)  # frames reaching one block
        self.pad = cfg.overlap_samples
        with torch.no_grad():
            self.embed = model.embed.weight.detach()  # (num_tokens, n_mels)
            w = model.conv_in.weight.detach()  # (dim, n_mels, k) -> (dim, k * n_mels)
            self.conv_in = Linear(w.permute(0, 2, 1).reshape(w.shape[0], -1), model.conv_in.bias)
            self.norm_in, self.norm_out = model.norm_in, model.norm_out
            self.blocks = [Block.of(b) for b in model.blocks]
            self.head = Linear(model.head.out.weight, model.head.out.bias)
            self.window = model.head.istft.window.detach()  # (n_fft,)
            sq = F.pad(self.window.square(), (0, self.r * cfg.hop - cfg.n_fft))  # (r * hop,)
            sq = sq.reshape(self.r, cfg.hop).cpu().numpy()
        env = np.zeros((self.r, self.r, cfg.hop), dtype=np.float32)
        for a in range(self.r):
            for b in range(a, self.r):
                env[a, b] = sq[a:b + 1].sum(0)
        env[env == 0] = 1.0  # only where no window reaches: positions the "same" trim drops
        self.envelope = env
        # conv context channels, in the order of the convs: conv_in's input, then each block's
        self.channels = [cfg.n_mels] + [cfg.dim] * len(self.blocks)
        self.versions = _versions(model)

    def zero_context(self) -> torch.Tensor:
        """A fresh stream's conv contexts: (k - 1, n_mels + dim * blocks), every conv's inputs
        before the first frame (zeros, the offline left padding)."""
        return torch.zeros(self.k - 1, sum(self.channels), device=self.device)

    def frames(self, tokens: torch.Tensor, contexts: torch.Tensor, lengths: list[int]
               ) -> tuple[np.ndarray, torch.Tensor]:
        """tokens (R,) long: the streams' new frames packed (stream b's lengths[b] frames after the
        earlier streams'), contexts (B, k - 1, channels) their conv contexts -> (each frame's
        windowed inverse FFT zero-padded, (R, r, hop) float32, the contexts after these frames)."""
        k, cfg = self.k, self.cfg
        B, R = len(lengths), tokens.shape[0]
        windows, last = _indices(lengths, k)
        windows, last = (torch.from_numpy(i.reshape(-1)).to(self.device) for i in (windows, last))
        ctx_rows = contexts.reshape(B * (k - 1), -1)  # (B * (k - 1), channels)
        new_ctx, at = [], 0

        def conv_inputs(x: torch.Tensor, c: int) -> torch.Tensor:
            """x (R, c) the conv's input rows -> its windows (R, k, c); keeps the new contexts."""
            nonlocal at
            rows = torch.cat([ctx_rows[:, at:at + c], x])  # (B * (k - 1) + R, c)
            at += c
            new_ctx.append(rows.index_select(0, last))  # (B * (k - 1), c)
            return rows.index_select(0, windows).view(R, k, c)

        x = F.embedding(tokens, self.embed)  # (R, n_mels)
        x = self.conv_in(conv_inputs(x, cfg.n_mels).reshape(R, -1))  # (R, dim)
        x = self.norm_in(x)
        for b in self.blocks:
            y = (conv_inputs(x, cfg.dim) * b.dw).sum(1) + b.dw_bias  # (R, dim): the causal conv
            x = x + b.pw2(b.pw1(b.norm(y), gelu=True))
        spec = self.head(self.norm_out(x))  # (R, n_fft + 2)
        mag, phase = spec.chunk(2, dim=1)  # (R, n_fft // 2 + 1) each
        mag = torch.exp(mag).clip(max=1e2)  # as vocos' ISTFTHead
        frames = torch.fft.irfft(torch.complex(mag * torch.cos(phase), mag * torch.sin(phase)),
                                 cfg.n_fft, dim=1) * self.window  # (R, n_fft)
        frames = F.pad(frames, (0, self.r * cfg.hop - cfg.n_fft)).reshape(R, self.r, cfg.hop)
        contexts = torch.cat(new_ctx, dim=1).reshape(B, k - 1, -1)  # (B, k - 1, channels)
        return frames.float().cpu().numpy(), contexts


def _indices(lengths: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices into [contexts (B * (k - 1)); packed frames (R)] for streams of these lengths:
    each frame's conv window (R, k) (its k - 1 previous inputs, then itself) and each stream's new
    context (B * (k - 1),) (its last k - 1 inputs). Stream b's sequence is its context then its
    frames: position q < k - 1 is context row b * (k - 1) + q, position q >= k - 1 packed frame
    offset[b] + q - (k - 1)."""
    B, c = len(lengths), k - 1
    lens = np.asarray(lengths, dtype=np.int64)
    offsets = B * c + np.concatenate([[0], np.cumsum(lens)[:-1]])  # each stream's first frame row
    stream = np.repeat(np.arange(B), lens)  # (R,): each frame's stream
    pos = np.arange(lens.sum()) - np.repeat(offsets - B * c, lens)  # (R,): frame's place in stream

    def rows(b: np.ndarray, q: np.ndarray) -> np.ndarray:  # sequence position q of stream b
        return np.where(q < c, b * c + q, offsets[b] + q - c)

    q = pos[:, None] + np.arange(k)  # (R, k): window positions (frame i sits at position i + c)
    windows = rows(stream[:, None], q)
    q = lens[:, None] + np.arange(c)  # (B, k - 1): the last k - 1 positions
    return windows, rows(np.arange(B)[:, None], q).reshape(-1)


def _versions(model: CausalVocos) -> int:
    """Changes whenever a parameter is changed in place (loading weights, fine-tuning)."""
    return sum(p._version for p in model.parameters())


_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def prepared(model: CausalVocos) -> Prepared:
    """The model's `Prepared` weights, built at its first stream and again after its weights
    change."""
    prep = _PREPARED.get(model)
    if prep is None or prep.versions != _versions(model):
        prep = _PREPARED[model] = Prepared(model)
    return prep


class StreamingVocoder:
    """Chunk-by-chunk decoding of one utterance that reproduces `model(all tokens)`.

    push(tokens) returns the samples that are final once those tokens are known: after T frames that
    is everything before T*hop - lookahead_samples. flush() returns the rest (up to T*hop) and resets.
    State: the causal convs' contexts and the overlap-add tail (the r - 1 blocks after frame T's
    start that earlier frames reach). A push replaces the state and never changes it in place, so a
    shallow copy is a snapshot (`engine.serving.vocoding` retries a failed pass from one).
    """

    def __init__(self, model: CausalVocos) -> None:
        self.model = model.eval()
        self.cfg = model.cfg
        self.prepared = prepared(model)
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
        self._context: torch.Tensor | None = None  # (k - 1, channels) conv contexts; None: zeros
        self._tail = np.zeros((self.prepared.r - 1, self.cfg.hop), dtype=np.float32)
        self.num_frames = 0  # frames pushed (T)

    def push(self, tokens: list[int] | np.ndarray | torch.Tensor) -> np.ndarray:
        """Append tokens (any 1-D int sequence); return the newly final samples (float32, maybe empty)."""
        return push_many([self], [tokens])[0]

    def flush(self) -> np.ndarray:
        """Return the remaining samples up to num_frames * hop, then start a new utterance."""
        prep, T, hop = self.prepared, self.num_frames, self.cfg.hop
        blocks = np.arange(T, T + prep.r - 1)  # the tail's blocks; frames 0..T-1 exist
        env = prep.envelope[blocks - T + 1, np.minimum(blocks, prep.r - 1)]  # (r - 1, hop)
        audio = (self._tail / env).reshape(-1)  # fold positions T*hop .. (T + r - 1)*hop
        out = audio[max(prep.pad, T * hop) - T * hop:prep.pad] if T else audio[:0]
        self.reset()
        return out

    def _add(self, frames: np.ndarray) -> np.ndarray:
        """Overlap-add this stream's new frames (n, r, hop); returns the samples now final."""
        prep, T, hop = self.prepared, self.num_frames, self.cfg.hop
        n, r = frames.shape[0], prep.r
        seg = np.zeros((n + r - 1, hop), dtype=np.float32)  # blocks T .. T + n + r - 2
        for i in range(r):
            seg[i:i + n] += frames[:, i]
        seg[:r - 1] += self._tail
        if T >= r - 1:  # every block past the start: all r frames reach it
            done = seg[:n] / prep.envelope[0, r - 1]
        else:
            done = seg[:n] / prep.envelope[0, np.minimum(np.arange(T, T + n), r - 1)]
        self._tail = seg[n:]  # a new array: the state is replaced, not changed
        self.num_frames = T + n
        return done.reshape(-1)[max(0, prep.pad - T * hop):]  # fold positions >= pad are samples


@torch.inference_mode()
def push_many(streams: list[StreamingVocoder], tokens: list) -> list[np.ndarray]:
    """`stream.push(tokens)` for several streams of one model in one pass over all their new frames
    (packed, no padding), so the weights are read once per call, not once per stream. Same samples
    as pushing each alone, to float rounding."""
    toks = [np.asarray(t, dtype=np.int64).reshape(-1) for t in tokens]
    out = [np.zeros(0, dtype=np.float32)] * len(streams)
    busy = [i for i, t in enumerate(toks) if len(t)]
    if not busy:
        return out
    prep = streams[busy[0]].prepared
    lengths = [len(toks[i]) for i in busy]
    contexts = torch.stack([streams[i]._context if streams[i]._context is not None
                            else prep.zero_context() for i in busy])  # (B, k - 1, channels)
    ids = torch.from_numpy(np.concatenate([toks[i] for i in busy])).to(prep.device)  # (R,)
    frames, contexts = prep.frames(ids, contexts, lengths)
    at = 0
    for row, (i, n) in enumerate(zip(busy, lengths)):
        out[i] = streams[i]._add(frames[at:at + n])
        streams[i]._context = contexts[row]
        at += n
    return out
