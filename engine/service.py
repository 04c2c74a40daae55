"""The speech service: text requests in, audio chunks out, the engine in its own thread.

A `SpeechStream` is one request (one HTTP call or one WebSocket session): text arrives whole or in
pieces (`add_text`, then `end_input`), each complete sentence is decoded as soon as it exists, and audio
comes back as events on an asyncio queue. The engine thread runs every active sentence of every stream in
one batched step, vocodes newly accepted tokens incrementally (a small first chunk for a low time to
first audio, larger ones after, never more than half the listener's buffer; all streams' chunks of a
step in one batched vocoder pass), and never blocks the event loop. A failure inside one request fails that
request only; cancelling (or a client disconnect) frees its cache slot at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import re
import threading
import time
from dataclasses import dataclass, field, replace

import numpy as np

from engine.scheduler import CAPACITY_MARGIN, Capacity, Playback, Policy
from engine.sequence import Sequence
from engine.tts import SentencePlan, TextToSpeech, merge_stats, stretch
from engine.types import GenerationConfig, GenerationStats

log = logging.getLogger("spectts.service")
FINAL = ("done", "error", "cancelled")
_SENTENCE_END = re.compile(r"[.!?;:][\"')\]]*\s+$|\n\s*$")


class ServiceBusy(RuntimeError):
    """The request queue is full or the running streams cannot take more (HTTP 503 with
    Retry-After)."""


@dataclass
class Event:
    kind: str  # "sentence_start" | "audio" | "sentence_done", then one of FINAL
    sentence_index: int = -1
    audio: np.ndarray | None = None  # float32 mono, for "audio"
    text: str = ""  # the sentence, for "sentence_start"
    stats: dict | None = None  # for "sentence_done" and "done"
    error: Exception | None = None  # for "error"


@dataclass
class _Sentence:
    plan: SentencePlan
    seq: Sequence
    index: int
    frames: list = field(default_factory=list)  # the voice's frames so far (`take_frames`)
    scanned: int = 0  # tokens of seq.tokens already read into `frames` (the prompt at the start)
    emitted: int = 0  # stretched frames already sent to the vocoder
    pending: list[int] = field(default_factory=list)  # stretched frames not yet vocoded
    chunks: int = 0  # vocoder pushes so far


class SpeechStream:
    """One request. Async side: `events()`; any thread: `add_text`, `end_input`, `cancel`."""

    def __init__(self, service: TTSService, cfg: GenerationConfig, speed: float,
                 loop: asyncio.AbstractEventLoop, voice: str | None = None) -> None:
        self.service, self.cfg, self.speed, self.loop = service, cfg, speed, loop
        self.voice = voice  # the speaker, for voices with several (None: the default)
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._lock = threading.Lock()
        self._text = ""  # received, not yet split into sentences
        self._input_done = False
        self.cancelled = False
        self.closed = False  # a final event ("done" / "error") was sent
        self.created = time.perf_counter()
        self.playback = Playback(self.created)  # the listener's clock: deadlines and underruns
        self.first_audio: float | None = None  # seconds from creation to the first audio chunk
        self.audio_seconds = 0.0
        self.stats = GenerationStats()
        self.sentences_started = 0
        self.current: _Sentence | None = None
        self.queued: list[SentencePlan] = []  # split, phonemised, not started
        self.vocoder = None  # the voice's streaming decoder, created in the engine thread

    # --- client side --------------------------------------------------------------------------
    def add_text(self, text: str) -> None:
        with self._lock:
            self._text += text
        self.service.wake()

    def end_input(self) -> None:
        with self._lock:
            self._input_done = True
        self.service.wake()

    def cancel(self) -> None:
        self.cancelled = True
        self.service.wake()

    async def events(self):
        """Yield events until a final one ("done", "error" or "cancelled")."""
        while True:
            event = await self._events.get()
            yield event
            if event.kind in FINAL:
                return

    # --- engine side --------------------------------------------------------------------------
    def emit(self, event: Event) -> None:
        if event.kind == "audio" and self.first_audio is None:
            self.first_audio = time.perf_counter() - self.created
        if event.kind in FINAL:
            self.closed = True
        try:
            self.loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (client side shut down)
            self.cancelled = True

    def take_sentences(self) -> tuple[list[str], bool]:
        """Complete sentences received so far, and whether the input has ended with none left."""
        from models.frontend import split_sentences

        with self._lock:
            text, final = self._text, self._input_done
            if not text.strip():
                self._text = ""
                return [], final
            pieces = split_sentences(text)
            if final or _SENTENCE_END.search(text):
                self._text = ""
                return pieces, final
            if len(pieces) <= 1:
                return [], False
            # the unfinished sentence waits for more text; keep its trailing space, or the next
            # word would be glued to its last one
            self._text = pieces[-1] + (" " if text[-1].isspace() else "")
            return pieces[:-1], False

    def summary(self) -> dict:
        wall = time.perf_counter() - self.created
        return {**self.stats.to_dict(), "audio_seconds": self.audio_seconds,
                "time_to_first_audio_seconds": self.first_audio, "wall_seconds": wall,
                "max_underrun_seconds": self.playback.max_underrun,
                "total_underrun_seconds": self.playback.total_underrun,
                "real_time_factor": wall / self.audio_seconds if self.audio_seconds else None}


class TTSService:
    def __init__(self, tts: TextToSpeech, queue_size: int = 64, first_chunk_frames: int = 4,
                 chunk_frames: int = 40, policy: Policy = Policy(), prefill_chunk: int = 64,
                 row_budget: int = 64, capacity_margin: float = CAPACITY_MARGIN) -> None:
        """first_chunk_frames .. chunk_frames: vocoder chunk sizes (`chunk_size`); prefill_chunk and
        row_budget: see Engine.step; capacity_margin: see `Capacity`."""
        self.tts = tts
        self.max_active = tts.engine.cache.max_batch
        # chunks never shrink below the first one's size (`chunk_size`)
        self.first_chunk_frames = first_chunk_frames
        self.chunk_frames = max(chunk_frames, first_chunk_frames)
        self.policy, self.prefill_chunk, self.row_budget = policy, prefill_chunk, row_budget
        self.capacity = Capacity(capacity_margin)
        self._waiting: queue.Queue[SpeechStream] = queue.Queue(maxsize=queue_size)
        self._active: list[SpeechStream] = []
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="spectts-engine", daemon=True)
        self.steps = 0

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self.wake()
        self._thread.join(timeout=10)

    def wake(self) -> None:
        self._wake.set()

    @property
    def waiting(self) -> int:
        return self._waiting.qsize()

    @property
    def active(self) -> int:
        return len(self._active)

    def overloaded(self) -> str | None:
        """Why a new request would be refused now (admission control), or None."""
        now = time.perf_counter()
        with self._waiting.mutex:
            oldest = self._waiting.queue[0].created if self._waiting.queue else None
        # every open stream counts against the capacity, also one whose text has not arrived yet
        # (a WebSocket session between its first input.text and its first sentence): counting only
        # those decoding let a burst of new sessions all in at once
        opened = [s for s in list(self._active) if not s.closed]
        return self.policy.refuse(opened, None if oldest is None else now - oldest, now,
                                  waiting=self.waiting, capacity=self.capacity.streams())

    def open(self, cfg: GenerationConfig, speed: float = 1.0,
             loop: asyncio.AbstractEventLoop | None = None, voice: str | None = None
             ) -> SpeechStream:
        """A new request; ServiceBusy when the queue is full or the running streams cannot take
        more (`overloaded`)."""
        self.tts.check(cfg)  # ValueError for a bad config, now
        if (reason := self.overloaded()) is not None:
            raise ServiceBusy(reason)
        stream = SpeechStream(self, cfg, speed, loop or asyncio.get_running_loop(), voice)
        try:
            self._waiting.put_nowait(stream)
        except queue.Full:
            raise ServiceBusy("the request queue is full") from None
        self.wake()
        return stream

    def calibrate(self, text: str, cfg: GenerationConfig, batches: tuple[int, ...] = (1, 8)) -> None:
        """Seed the capacity model before serving (call before `start`): decode `text`'s first
        sentence as batches of these sizes and vocode it, as the engine thread would."""
        plan = self.tts.plan(text)[0]
        gen_cfg = self.tts.generation_config(plan, cfg)
        for n in sorted({min(b, self.max_active) for b in batches}):
            start = time.perf_counter()
            results = self.tts.engine.generate_batch(
                [plan.prompt] * n, [gen_cfg] * n, [self.tts.rule(plan) for _ in range(n)],
                self.prefill_chunk, self.row_budget)
            audio = sum(len(self.tts.vocode(self.tts.take_frames(r.tokens, 0)[0]))
                        for r in results) / self.tts.sample_rate
            seconds = time.perf_counter() - start
            steps = max(r.stats.target_forwards for r in results)  # same prompts: one per step
            for _ in range(steps):
                self.capacity.record(n, seconds / steps, audio / steps)

    # --- the engine thread --------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop:
            while len(self._active) < self.max_active and not self._waiting.empty():
                stream = self._waiting.get_nowait()
                if stream.cancelled:  # left while waiting: never takes a slot
                    self._close(stream, Event("cancelled", stats=stream.summary()))
                    continue
                stream.vocoder = self.tts.stream_decoder()
                self._active.append(stream)
            for stream in list(self._active):
                self._advance_input(stream)
            self._active = [s for s in self._active if not s.closed]
            running = [s for s in self._active if s.current is not None]
            if not running:
                self._wake.wait(timeout=0.05)
                self._wake.clear()
                continue
            start = time.perf_counter()
            chosen = self.policy.select(running, start)
            # the capacity model learns from decoding steps: a prompt's prefill is paid once per
            # sentence, and newcomers arriving together would make a batch look far dearer
            decoding = not any(self.tts.engine.prefilling(s.current.seq) for s in chosen)
            self._step([s.current.seq for s in chosen], chosen)
            decoded = self._collect([s for s in chosen if s.current is not None])
            if decoding:
                self.capacity.record(len(chosen), time.perf_counter() - start, decoded)
            self._active = [s for s in self._active if not s.closed]
            self.steps += 1

    def _advance_input(self, stream: SpeechStream) -> None:
        """Start the stream's next sentence, finish or drop the stream."""
        try:
            if stream.cancelled:
                self._close(stream, Event("cancelled", stats=stream.summary()))
                return
            if stream.current is not None:
                return
            sentences, final = stream.take_sentences()
            for text in sentences:
                stream.queued.extend(self.tts.plan(text, voice=stream.voice))
            if stream.queued:
                plan = stream.queued.pop(0)
                cfg = self.tts.generation_config(plan, stream.cfg)
                seq = self.tts.engine.add(plan.prompt, cfg, self.tts.rule(plan))
                stream.current = _Sentence(plan, seq, stream.sentences_started,
                                           scanned=len(seq.prompt))
                stream.sentences_started += 1
                stream.emit(Event("sentence_start", stream.current.index, text=plan.text))
            elif final:
                self._close(stream, Event("done", stats=stream.summary()))
            else:
                stream.playback.idle(time.perf_counter())
        except Exception as exc:  # noqa: BLE001 — this request fails, the loop goes on
            self._close(stream, Event("error", error=exc))

    def _step(self, seqs: list[Sequence], streams: list[SpeechStream]) -> None:
        engine, chunk, budget = self.tts.engine, self.prefill_chunk, self.row_budget
        try:
            engine.step(seqs, prefill_chunk=chunk, row_budget=budget)
        except Exception:  # noqa: BLE001 — find the request at fault: step each alone
            for seq, stream in zip(seqs, streams):
                try:
                    if not seq.finished:
                        engine.step([seq], prefill_chunk=chunk, row_budget=budget)
                except Exception as exc:  # noqa: BLE001
                    self._fail(stream, exc, "request failed inside the engine step")

    def chunk_size(self, index: int, buffered_s: float | None = None) -> int:
        """Frames vocoded together in a sentence's chunk `index`: a small first chunk (time to first
        audio), then growing by half each time up to chunk_frames (fewer, larger vocoder pushes: a
        push costs about as much for 1 frame as for 6). The first chunk also covers the vocoder's
        lookahead, so that it carries first_chunk_frames of audio (4 frames: 80 ms), not 30 ms less.
        buffered_s: the audio the listener still has; a chunk is then at most half of it (at least
        first_chunk_frames), so the next chunk is decoded before the buffer runs out while the
        stream decodes faster than half real time. The streaming vocoder gives the same samples
        however the frames are chunked."""
        first, largest = self._frames(self.first_chunk_frames), self._frames(self.chunk_frames)
        if index == 0:
            return first + -(-self.tts.lookahead_samples // self._hop)
        size = min(largest, int(first * 1.5 ** index))
        if buffered_s is not None:
            frame_s = self._hop / self.tts.sample_rate
            size = min(size, max(first, int(buffered_s / 2 / frame_s)))
        return size

    def _frames(self, units: int) -> int:
        """Chunk sizes are set in 20 ms units (the shipped voice's frames): the voice's frames that
        cover as much audio, at least one (a SNAC frame is 85 ms)."""
        return max(1, -(-units * self.tts.sample_rate // (50 * self._hop)))

    @property
    def _hop(self) -> int:
        """Samples per frame of the voice."""
        return self.tts.hop

    def _collect(self, streams: list[SpeechStream]) -> float:
        """Vocode what each stream's current sentence has accepted, every push of the step in one
        batched vocoder pass (`push_many`); finish sentences whose sequence has ended. Returns the
        seconds of audio the step decoded (vocoded now or later)."""
        decoded, pushes = 0.0, {}  # stream -> frames to vocode now
        for stream in streams:
            try:
                seconds, frames = self._take(stream)
                decoded += seconds
                if frames:
                    pushes[stream] = frames
            except Exception as exc:  # noqa: BLE001
                self._fail(stream, exc, "request failed while vocoding")
        try:
            audio = dict(zip(pushes, self.tts.push_many([s.vocoder for s in pushes],
                                                         list(pushes.values()))))
        except Exception as exc:  # noqa: BLE001 — not a request's fault (its tokens are the
            # model's own): the streams of this pass fail, the others and the loop go on
            for stream in pushes:
                self._fail(stream, exc, "the vocoder failed")
            audio = {}
        for stream in streams:
            if stream.current is not None:
                try:
                    self._deliver(stream, audio.get(stream))
                except Exception as exc:  # noqa: BLE001
                    self._fail(stream, exc, "request failed while vocoding")
        return decoded

    def _take(self, stream: SpeechStream) -> tuple[float, list[int]]:
        """The current sentence's newly decoded frames (stretched by the stream's speed) join its
        pending ones; returns their seconds of audio and the frames to vocode now (`chunk_size`),
        if any."""
        sent, playback = stream.current, stream.playback
        tokens = sent.seq.tokens  # prompt + generated, only ever appended to: read the new ones
        frames, sent.scanned = self.tts.take_frames(tokens, sent.scanned)
        sent.frames += frames
        new, sent.emitted = stretch(sent.frames, stream.speed, sent.emitted)
        sent.pending += new
        threshold = self.chunk_size(sent.chunks, playback.slack(time.perf_counter())
                                    if playback.started else None)
        frames = []
        if sent.pending and (len(sent.pending) >= threshold or sent.seq.finished):
            frames, sent.pending = sent.pending, []
            sent.chunks += 1
        return len(new) * self._hop / self.tts.sample_rate, frames

    def _deliver(self, stream: SpeechStream, audio: np.ndarray | None) -> None:
        """Send the sentence's vocoded audio (and, when its sequence has ended, the vocoder's rest),
        then finish the sentence if it has ended."""
        sent = stream.current
        parts = [] if audio is None else [audio]
        if sent.seq.finished:
            parts.append(stream.vocoder.flush())
        chunk = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        if len(chunk):
            seconds = len(chunk) / self.tts.sample_rate
            stream.audio_seconds += seconds
            stream.playback.sent(seconds, time.perf_counter())
            stream.emit(Event("audio", sent.index, audio=np.clip(chunk, -1, 1)))
        if sent.seq.finished:
            merge_stats(stream.stats, sent.seq.stats)
            stream.emit(Event("sentence_done", sent.index, stats=sent.seq.stats.to_dict()))
            self.tts.engine.release(sent.seq)
            stream.current = None

    def _fail(self, stream: SpeechStream, exc: Exception, what: str) -> None:
        """Log the failure and end this stream with an error event; the others go on."""
        log.exception(what)
        self._close(stream, Event("error", error=exc))

    def _close(self, stream: SpeechStream, event: Event) -> None:
        if stream.current is not None:
            self.tts.engine.release(stream.current.seq)
            stream.current = None
        if not stream.closed:
            stream.emit(event)
        stream.closed = True

    # --- convenience --------------------------------------------------------------------------
    def speak(self, text: str, cfg: GenerationConfig, speed: float = 1.0,
              loop: asyncio.AbstractEventLoop | None = None, voice: str | None = None
              ) -> SpeechStream:
        """A whole-text request, phonemised once, here (ValueError now for unspeakable text)."""
        if (reason := self.overloaded()) is not None:  # before phonemising: refusals stay cheap
            raise ServiceBusy(reason)
        plans = self.tts.plan(text, voice=voice)
        stream = self.open(replace(cfg), speed, loop, voice)
        stream.queued.extend(plans)  # before end_input: the engine thread then starts them in order
        stream.end_input()
        return stream
