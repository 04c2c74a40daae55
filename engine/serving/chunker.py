"""A sentence's audio path inside a stream: frames -> time-stretch -> chunks -> the voice's decoder.

The engine thread reads each sentence's newly accepted tokens after every step (`SentenceAudio.take`),
keeps the voice's frames (its `take_frames`: speech tokens of a bundle, 7-code SNAC frames of an
Orpheus checkpoint), stretches them by the stream's speed, and hands a chunk to the vocoder when
enough have gathered (`ChunkSizes`): a small first chunk for a low time to first audio, larger ones
after, never more than half the listener's buffer. The streaming vocoder gives the same samples
however the frames are chunked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from engine.decoding.sequence import Sequence
from engine.tts import SentencePlan, stretch

# the voice's hook: (tokens, how many were read) -> (the frames among the new ones, how far read)
TakeFrames = Callable[[list[int], int], tuple[list, int]]


@dataclass(frozen=True)
class ChunkSizes:
    first_chunk_frames: int  # speech frames in a sentence's first chunk
    chunk_frames: int  # the largest chunk (never below the first)
    lookahead_frames: int  # frames the vocoder holds back (its overlap)
    frame_s: float  # seconds of audio per speech frame

    @classmethod
    def for_voice(cls, first_units: int, largest_units: int, hop: int, sample_rate: int,
                  lookahead_samples: int) -> ChunkSizes:
        """Sizes set in 20 ms units (the shipped voice's frames) -> the voice's frames that cover
        as much audio, at least one (a SNAC frame is 85 ms); `hop`: samples per frame."""
        def frames(units: int) -> int:
            return max(1, -(-units * sample_rate // (50 * hop)))

        return cls(frames(first_units), frames(largest_units),
                   lookahead_frames=-(-lookahead_samples // hop), frame_s=hop / sample_rate)

    def size(self, index: int, buffered_s: float | None = None) -> int:
        """Frames vocoded together in a sentence's chunk `index`: a small first chunk (time to first
        audio), then growing by half each time up to chunk_frames (fewer, larger vocoder pushes: a
        push costs about as much for 1 frame as for 6). The first chunk also covers the vocoder's
        lookahead, so that it carries first_chunk_frames of audio, not the lookahead less.
        buffered_s: the audio the listener still has; a chunk is then at most half of it (at least
        first_chunk_frames), so the next chunk is decoded before the buffer runs out while the
        stream decodes faster than half real time."""
        if index == 0:
            return self.first_chunk_frames + self.lookahead_frames
        size = min(max(self.chunk_frames, self.first_chunk_frames),
                   int(self.first_chunk_frames * 1.5 ** index))
        if buffered_s is not None:
            size = min(size, max(self.first_chunk_frames, int(buffered_s / 2 / self.frame_s)))
        return size


@dataclass
class SentenceAudio:
    """One sentence of a stream: its sequence and where its audio stands."""

    plan: SentencePlan
    seq: Sequence
    index: int  # the sentence's place in its stream
    frames: list = field(default_factory=list)  # the voice's frames so far (`take_frames`)
    scanned: int = 0  # tokens of seq.tokens already read into `frames` (the prompt at the start)
    emitted: int = 0  # stretched frames already sent to the vocoder
    pending: list = field(default_factory=list)  # stretched frames not yet vocoded
    chunks: int = 0  # vocoder pushes so far

    def take(self, take_frames: TakeFrames, speed: float, sizes: ChunkSizes,
             buffered_s: float | None) -> tuple[int, list]:
        """The newly decoded frames (stretched by `speed`) join the pending ones; returns how many
        new frames there were and the frames to vocode now (a whole chunk, or the rest once the
        sequence has ended), if any."""
        tokens = self.seq.tokens  # prompt + generated, only ever appended to: read the new ones
        frames, self.scanned = take_frames(tokens, self.scanned)
        self.frames += frames
        new, self.emitted = stretch(self.frames, speed, self.emitted)
        self.pending += new
        out: list = []
        if self.pending and (len(self.pending) >= sizes.size(self.chunks, buffered_s)
                             or self.seq.finished):
            out, self.pending = self.pending, []
            self.chunks += 1
        return len(new), out
