"""Audio encoding: whole files with soundfile (libsndfile), and the byte streams of chunked responses.

A stream is one container: a WAV stream is one 44-byte header whose RIFF and data sizes are 0xFFFFFFFF
("unknown length", as OpenAI's streamed WAV) followed by PCM16 chunks; a PCM stream is the chunks alone.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import soundfile

CONTENT_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac",
                 "mp3": "audio/mpeg", "opus": "audio/ogg; codecs=opus"}
# format -> (libsndfile container, subtype)
_SOUNDFILE = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"),
              "mp3": ("MP3", "MPEG_LAYER_III"), "opus": ("OGG", "OPUS")}
OPUS_RATES = (48000, 24000, 16000, 12000, 8000)
_UNKNOWN = 0xFFFFFFFF


def supported_formats() -> tuple[str, ...]:
    """The response formats this machine's libsndfile can write (MP3 needs libsndfile >= 1.1 built
    with lame/mpg123; opus needs it built with libopus)."""
    out = ["pcm"]
    for name, (container, subtype) in _SOUNDFILE.items():
        if container in soundfile.available_formats() and \
                subtype in soundfile.available_subtypes(container):
            out.append(name)
    return tuple(out)


def pcm16(audio: np.ndarray) -> bytes:
    """float32 mono in [-1, 1] -> 16-bit little-endian PCM, converted by libsndfile exactly as it
    converts the samples of a WAV file (so streamed PCM equals the file's samples)."""
    audio = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0)
    if len(audio) == 0:
        return b""
    buf = io.BytesIO()
    soundfile.write(buf, audio, 8000, format="RAW", subtype="PCM_16", endian="LITTLE")
    return buf.getvalue()


def wav_stream_header(sample_rate: int, channels: int = 1, bits: int = 16) -> bytes:
    """A RIFF/WAVE header for a PCM stream of unknown length (sizes 0xFFFFFFFF)."""
    block = channels * bits // 8
    return (b"RIFF" + struct.pack("<I", _UNKNOWN) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate,
                                    sample_rate * block, block, bits)
            + b"data" + struct.pack("<I", _UNKNOWN))


def opus_rate(sample_rate: int) -> int:
    """The smallest rate opus accepts that keeps the voice's bandwidth (48 kHz if none is above)."""
    return min((r for r in OPUS_RATES if r >= sample_rate), default=48000)


def resample(audio: np.ndarray, src: int, dst: int) -> np.ndarray:
    """Band-limited resampling (torchaudio's windowed sinc)."""
    if src == dst:
        return audio
    import torch
    import torchaudio.functional

    out = torchaudio.functional.resample(torch.from_numpy(np.ascontiguousarray(audio)), src, dst)
    return out.numpy().astype(np.float32)


def encode(audio: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """A whole file (or raw PCM16) of `audio`; ValueError for a format libsndfile lacks here."""
    if fmt == "pcm":
        return pcm16(audio)
    if fmt not in supported_formats():
        raise ValueError(f"response_format {fmt!r} is not supported by this server's libsndfile")
    container, subtype = _SOUNDFILE[fmt]
    if fmt == "opus":
        rate = opus_rate(sample_rate)
        audio, sample_rate = resample(audio, sample_rate, rate), rate
    if len(audio) == 0:  # libsndfile writes no frames for an empty file in some containers
        audio = np.zeros(1, np.float32)
    audio = np.clip(audio, -1.0, 1.0)
    if subtype == "PCM_16":  # the same integer samples as the pcm format and the streams
        audio = np.frombuffer(pcm16(audio), "<i2")
    buf = io.BytesIO()
    soundfile.write(buf, audio, sample_rate, format=container, subtype=subtype)
    return buf.getvalue()


class StreamEncoder:
    """Bytes of a streamed response: `start()` once (the WAV header, or nothing), then
    `chunk(audio)` for each piece of audio."""

    def __init__(self, fmt: str, sample_rate: int) -> None:
        if fmt not in ("wav", "pcm"):
            raise ValueError(f"streaming supports wav and pcm, not {fmt!r}")
        self.fmt, self.sample_rate = fmt, sample_rate

    def start(self) -> bytes:
        return wav_stream_header(self.sample_rate) if self.fmt == "wav" else b""

    def chunk(self, audio: np.ndarray) -> bytes:
        return pcm16(audio)
