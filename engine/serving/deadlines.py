"""Playback deadlines: which streams the next engine step runs, and whether to admit more.

Every stream is heard by a listener whose player starts at the stream's first audio and then plays
continuously (`Playback`). A stream's *slack* is how much audio that player still has buffered; it runs
dry (an underrun) when the slack reaches zero before the next chunk. The scheduler orders streams as
VoxServe does: streams in startup (no audio yet) first, oldest first, then by deadline, the one closest
to running dry first. When some stream is urgent, streams with plenty buffered sit the step out, so the
batched forward is smaller and the urgent ones get their audio sooner. Admission holds the queue (FIFO)
while the running streams already fill the machine or one of them is behind, rather than letting every
stream fall behind; a request held past `max_queue_wait_s` is refused.

No torch, no threads: plain policy, tested on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass
class Playback:
    """The listener's clock of one stream (all times from time.perf_counter())."""

    created: float
    play_end: float | None = None  # when the audio sent so far runs out; None: not started
    max_underrun: float = 0.0  # longest single stall, seconds
    total_underrun: float = 0.0

    @property
    def started(self) -> bool:
        return self.play_end is not None

    def sent(self, seconds: float, now: float) -> float:
        """`seconds` of audio leave at `now`; returns the stall they end (0.0 if none)."""
        stall = 0.0
        if self.play_end is None:
            self.play_end = now
        elif now > self.play_end:
            stall = now - self.play_end
            self.max_underrun = max(self.max_underrun, stall)
            self.total_underrun += stall
            self.play_end = now
        self.play_end += seconds
        return stall

    def idle(self, now: float) -> None:
        """The stream waits for its client (no text to speak): the silence that follows is the
        client's, not an underrun. The clock restarts at the next audio."""
        if self.play_end is not None and self.play_end < now:
            self.play_end = None

    def slack(self, now: float) -> float:
        """Seconds of audio buffered at the listener (negative: stalled that long); -inf before the
        first audio (startup is the most urgent)."""
        return float("-inf") if self.play_end is None else self.play_end - now


class Scheduled(Protocol):
    playback: Playback


@dataclass(frozen=True)
class Policy:
    urgent_s: float = 0.5  # a stream with less audio buffered than this is urgent
    ahead_s: float = 2.0  # while any is urgent, streams with more buffered than this sit out a step
    max_queue_wait_s: float = 2.0  # a request waits in the queue this long at most, then is refused
    behind_s: float = 0.1  # hold the queue while a running stream has stalled this long
    adaptive: bool = True  # False: hold only for free slots, never from the load (tests, benches)

    def order(self, streams: list[Scheduled]) -> list[Scheduled]:
        """Most urgent first: startup (oldest first), then by the time each runs dry."""
        def key(s: Scheduled) -> tuple[int, float]:
            p = s.playback
            return (0, p.created) if not p.started else (1, p.play_end)
        return sorted(streams, key=key)

    def select(self, streams: list[Scheduled], now: float) -> list[Scheduled]:
        """The streams the next step runs, most urgent first."""
        ranked = self.order(streams)
        if not any(s.playback.slack(now) < self.urgent_s for s in ranked):
            return ranked
        return [s for s in ranked if s.playback.slack(now) <= self.ahead_s]

    def hold(self, running: list[Scheduled], now: float, capacity: int | None = None
             ) -> str | None:
        """Why the queue's next request must wait now, or None to admit it. `running`: the open
        streams (those still waiting for their text count too); `capacity`: the streams the machine
        keeps ahead of real time (`Capacity.streams`), None if unknown."""
        if not self.adaptive:
            return None
        if capacity is not None and len(running) + 1 > capacity:
            return f"{len(running)} requests running; this machine keeps {capacity} ahead of real time"
        behind = [s for s in running if s.playback.started and s.playback.slack(now) < -self.behind_s]
        if behind:
            return f"{len(behind)} running stream(s) are behind real time"
        return None
