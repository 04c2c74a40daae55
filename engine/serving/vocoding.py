"""The speech service's vocoder stage: each stream's accepted frames to audio events, in order,
batched across streams, in its own thread (or inline, in the engine thread).

After each step the engine thread hands over `Work`, in each stream's order: `Note`s (an event to
send in its place: a sentence's start, the stream's final event) and `Frames` (a chunk to vocode;
a sentence's last one carries its stats: the decoder's rest is flushed, then `SENTENCE_DONE`). The
vocoder thread takes everything handed over so far and vocodes it in rounds: each round sends every
stream's leading notes, then vocodes every stream's next frames (its consecutive chunks of one
sentence joined) in ONE batched pass (`push_many`), then sends their audio. So a stream's events
leave in the order the engine produced them, and torch, releasing the GIL inside its ops, runs the
vocoder on the second core while the engine decodes the next step.

Resources: the engine thread owns a stream's sequence (KV cache slot) and frees it when the engine
is done with the stream; this stage owns its streaming decoder and frees it once the stream's final
event has left. A stream that was cancelled gets no more audio (its queued frames are dropped). A
vocoder failure fails its stream only: a failed batched pass is retried stream by stream from the
decoders' state before it (`push_many` replaces a decoder's state, never changes it in place, so a
shallow copy is a snapshot), the stream at fault gets its error event and `failed`, and the engine
thread drops it at its next step.

Backpressure: the frames handed over and not yet vocoded (the backlog) stay within
`max_backlog_frames`; `submit` blocks the engine thread until they fit, unless none are waiting
(a step's frames are never split). So the engine runs at most that far ahead of the vocoder, memory
stays flat, and a newcomer's first chunk waits for at most one pass over the backlog.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

from engine.serving.stream import FINAL, Event, EventKind, SpeechStream

log = logging.getLogger("spectts.vocoding")


@dataclass
class Frames:
    """Frames of a stream's sentence to vocode (in the voice's unit: `take_frames`)."""

    stream: SpeechStream
    index: int  # the sentence's place in its stream
    frames: list  # may be empty (a sentence ending with no new frames)
    stats: dict | None = None  # set on the sentence's last frames: flush, then SENTENCE_DONE


@dataclass
class Note:
    """An event to send in its place among the stream's audio. A final event gets the stream's
    summary when it is sent (`SpeechStream.end`: its audio seconds and wall time are known only
    then)."""

    stream: SpeechStream
    event: Event


Work = Frames | Note


class Vocoding:
    """The vocoder stage of one service. Engine thread: `submit`, `busy`; `start` / `stop`."""

    def __init__(self, tts, threaded: bool, max_backlog_frames: int,
                 threads: int | None = None, wake: Callable[[], None] = lambda: None) -> None:
        """tts: the voice (`stream_decoder`, `push_many`, `sample_rate`); threaded: in its own
        thread (False: `submit` vocodes at once, in the caller's thread); threads: torch intra-op
        threads of the vocoder thread (None: torch's setting); wake: tells the engine thread that a
        stream failed here."""
        self.tts, self.threaded, self.threads, self.wake = tts, threaded, threads, wake
        self.max_backlog_frames = max_backlog_frames
        self.backlog = 0  # frames handed over and not yet vocoded (or dropped)
        self.peak_backlog = 0  # the most there ever were
        self.held = 0  # hand-overs that waited for the vocoder (the engine was ahead by the bound)
        self._queue: deque[Work] = deque()  # handed over, not yet taken by the vocoder thread
        self._cond = threading.Condition()  # guards the above; notified on hand-over and progress
        self._pending: dict[SpeechStream, int] = {}  # items handed over and not yet done
        self._decoders: dict[SpeechStream, object] = {}  # each stream's streaming decoder
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="spectts-vocoder", daemon=True)

    # --- the engine thread -------------------------------------------------------------------
    def start(self) -> None:
        if self.threaded:
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def submit(self, work: list[Work]) -> None:
        """Hand over one step's work, in each stream's order. Blocks while the backlog would pass
        `max_backlog_frames` (and is not empty)."""
        if not work:
            return
        frames = sum(len(w.frames) for w in work if isinstance(w, Frames))
        with self._cond:
            if self.backlog and self.backlog + frames > self.max_backlog_frames:
                self.held += 1
            while (self.backlog and self.backlog + frames > self.max_backlog_frames
                   and not self._stopping):
                self._cond.wait()
            self.backlog += frames
            self.peak_backlog = max(self.peak_backlog, self.backlog)
            for w in work:
                self._pending[w.stream] = self._pending.get(w.stream, 0) + 1
            if self.threaded:
                self._queue.extend(work)
                self._cond.notify_all()
        if not self.threaded:
            self._process(work)

    def busy(self, stream: SpeechStream) -> bool:
        """Whether some of the stream's work is not done yet (its audio clock still moves)."""
        return stream in self._pending

    @property
    def streams(self) -> int:
        """Streams holding a decoder here (those whose final event has not left yet)."""
        return len(self._decoders)

    # --- the vocoder thread ------------------------------------------------------------------
    def _run(self) -> None:
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)  # this thread's intra-op pool (OpenMP: per thread)
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                work = list(self._queue)
                self._queue.clear()
            self._process(work)

    def _process(self, work: list[Work]) -> None:
        """Send every stream's work in its order, in rounds of one batched vocoder pass."""
        lanes: dict[SpeechStream, deque[Work]] = {}
        for w in work:
            lanes.setdefault(w.stream, deque()).append(w)
        while lanes:
            batch: list[tuple[Frames, int]] = []  # a stream's joined frames, items they took
            for stream, lane in lanes.items():
                while lane and isinstance(lane[0], Note):
                    self._note(lane.popleft())
                    self._done(stream, 1, 0)
                if lane:
                    batch.append(self._join(lane))
            self._vocode(batch)
            lanes = {s: lane for s, lane in lanes.items() if lane}

    @staticmethod
    def _join(lane: deque[Work]) -> tuple[Frames, int]:
        """The lane's leading frames of one sentence as one chunk (the streaming decoder gives the
        same samples however they are chunked), up to its sentence's last."""
        first = lane.popleft()
        frames, stats, taken = list(first.frames), first.stats, 1
        while stats is None and lane and isinstance(lane[0], Frames):
            nxt = lane.popleft()
            frames += nxt.frames
            stats, taken = nxt.stats, taken + 1
        return Frames(first.stream, first.index, frames, stats), taken

    def _vocode(self, batch: list[tuple[Frames, int]]) -> None:
        live = []
        for f, n in batch:
            if f.stream.cancelled or f.stream.closed:  # nobody listens: drop its audio
                self._done(f.stream, n, len(f.frames))
            else:
                live.append((f, n))
        decoders = [self._decoders.setdefault(f.stream, self.tts.stream_decoder()) for f, _ in live]
        audio = self._push(decoders, [f for f, _ in live])
        for (f, n), decoder, samples in zip(live, decoders, audio):
            try:
                if samples is not None:
                    self._deliver(f, decoder, samples)
            except Exception as exc:  # noqa: BLE001 — this stream fails, the others go on
                self._fail(f.stream, exc)
            self._done(f.stream, n, len(f.frames))

    def _push(self, decoders: list, chunks: list[Frames]) -> list[np.ndarray | None]:
        """One batched pass; when it fails, each stream alone from its state before it (None for
        a stream that fails alone, which is failed)."""
        if not chunks:
            return []
        saved = [copy.copy(d) for d in decoders]
        try:
            return self.tts.push_many(decoders, [c.frames for c in chunks])
        except Exception:  # noqa: BLE001 — find the stream at fault
            log.warning("a batched vocoder pass failed; retrying its streams one by one")
        out: list[np.ndarray | None] = []
        for decoder, before, chunk in zip(decoders, saved, chunks):
            vars(decoder).update(vars(before))
            try:
                out.append(self.tts.push_many([decoder], [chunk.frames])[0])
            except Exception as exc:  # noqa: BLE001
                self._fail(chunk.stream, exc)
                out.append(None)
        return out

    def _deliver(self, chunk: Frames, decoder, samples: np.ndarray) -> None:
        """Send the chunk's audio (with the decoder's rest when its sentence has ended), then the
        sentence's end."""
        stream = chunk.stream
        parts = [samples] + ([decoder.flush()] if chunk.stats is not None else [])
        audio = np.concatenate(parts)
        if len(audio):
            seconds = len(audio) / self.tts.sample_rate
            stream.audio_seconds += seconds
            stream.playback.sent(seconds, time.perf_counter())
            stream.emit(Event(EventKind.AUDIO, chunk.index, audio=np.clip(audio, -1, 1)))
        if chunk.stats is not None:
            stream.emit(Event(EventKind.SENTENCE_DONE, chunk.index, stats=chunk.stats))

    def _note(self, note: Note) -> None:
        stream, event = note.stream, note.event
        if stream.closed:  # failed here already: its error was its final event
            return
        if event.kind in FINAL:
            self._decoders.pop(stream, None)
            stream.end(event.kind, event.error)
        else:
            stream.emit(event)

    def _fail(self, stream: SpeechStream, exc: Exception) -> None:
        """End the stream with its error now; the engine thread drops it at its next step."""
        log.error("the vocoder failed for a stream", exc_info=exc)
        self._decoders.pop(stream, None)
        stream.failed = exc
        if not stream.closed:
            stream.emit(Event(EventKind.ERROR, error=exc))
        self.wake()

    def _done(self, stream: SpeechStream, items: int, frames: int) -> None:
        """Items of the stream are done, their frames vocoded or dropped."""
        with self._cond:
            left = self._pending.get(stream, 0) - items
            if left > 0:
                self._pending[stream] = left
            else:
                self._pending.pop(stream, None)
            self.backlog -= frames
            self._cond.notify_all()
