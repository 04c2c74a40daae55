"""Capacity: how many streams this machine keeps ahead of real time, learned from the engine's own
steps; admission (`engine.serving.deadlines.Policy.hold`) holds the queue beyond it."""

from __future__ import annotations

from collections import deque

import numpy as np

# streams are admitted while each would be decoded this much faster than real time: the room left
# for step-to-step variation, so that admitted streams do not stall (measurements: docs/serving.md)
CAPACITY_MARGIN = 2.0


class ServiceBusy(RuntimeError):
    """A request refused: the queue is full, or it waited `max_queue_wait_s` without a free stream
    (HTTP 503 with Retry-After)."""


class Capacity:
    """How many streams the engine keeps ahead of real time, learned from its own steps.

    Each decoding step (no prompt prefill in it) records (streams it ran, its wall seconds with
    vocoding, or with waiting for the vocoder thread when that is behind, seconds of audio it
    decoded). A step costs about a + b * n for n streams and gives
    each about r seconds of audio, so n streams all play in real time with `margin` to spare while
    r / (a + b * n) >= margin. a and b are
    a least-squares fit over the recent window; with a single batch size in it, a = 0 (the cost is taken
    as proportional to n, which underestimates the capacity: safe).
    """

    def __init__(self, margin: float = CAPACITY_MARGIN, window: int = 512) -> None:
        self.margin = margin
        self.samples: deque[tuple[int, float, float]] = deque(maxlen=window)

    def record(self, streams: int, seconds: float, audio_seconds: float) -> None:
        if streams > 0 and seconds > 0:
            self.samples.append((streams, seconds, audio_seconds))

    def streams(self) -> int | None:
        if len(self.samples) < 8:
            return None
        # a snapshot: the engine thread appends while request threads ask
        n, t, audio = (np.array(x, dtype=float) for x in zip(*tuple(self.samples)))
        r = audio.sum() / n.sum()  # audio seconds per stream per step
        if r <= 0:
            return None
        a, b = 0.0, t.sum() / n.sum()
        if n.std() > 0.5:
            slope, intercept = np.polyfit(n, t, 1)
            if slope > 0 and intercept >= 0:
                a, b = intercept, slope
        return max(1, int((r / self.margin - a) / b))
