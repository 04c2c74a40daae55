"""An independent judge of naturalness: Microsoft's DNSMOS (P.835 SIG / BAK / OVRL and P.808 MOS).

The ONNX models ship inside the `speechmos` package (with `onnxruntime` and `librosa`, the `eval`
extra); nothing is downloaded. DNSMOS was trained on human ratings of noisy and processed speech: it
scores how natural and clean audio sounds, never what it says (Whisper judges that, `bench/asr.py`).
Audio is resampled to 16 kHz; DNSMOS scores 9 s windows, and a shorter clip is repeated to fill one,
as the reference implementation does. Scores are 1 (bad) to 5 (excellent).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DNSMOS_SAMPLE_RATE = 16000
FIELDS = ("ovrl_mos", "sig_mos", "bak_mos", "p808_mos")


class NaturalnessJudge:
    """score(audio, sample_rate) -> {"ovrl_mos", "sig_mos", "bak_mos", "p808_mos"}."""

    def __init__(self) -> None:
        try:
            from speechmos import dnsmos
        except ImportError as e:
            raise ImportError("DNSMOS needs the eval extra: pip install speechmos onnxruntime librosa") from e
        self._dnsmos = dnsmos

    def score(self, audio: np.ndarray, sample_rate: int) -> dict[str, float]:
        """audio: float mono in [-1, 1] (any length > 0) at `sample_rate`."""
        x = np.asarray(audio, dtype=np.float32).reshape(-1)
        if len(x) == 0:
            raise ValueError("no audio to score")
        if sample_rate != DNSMOS_SAMPLE_RATE:
            import torch
            import torchaudio

            x = torchaudio.functional.resample(torch.from_numpy(x), sample_rate,
                                               DNSMOS_SAMPLE_RATE).numpy()
        x = np.clip(x, -1.0, 1.0)
        raw = self._dnsmos.run(x, DNSMOS_SAMPLE_RATE)
        return {k: float(raw[k]) for k in FIELDS}

    def score_many(self, clips: Sequence[np.ndarray], sample_rate: int) -> dict[str, float]:
        """The mean of each score over `clips`."""
        scores = [self.score(c, sample_rate) for c in clips]
        return {k: float(np.mean([s[k] for s in scores])) for k in FIELDS}
