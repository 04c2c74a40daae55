"""The speech service: text requests in, audio chunks out, the engine in its own thread.

It ties three parts: admission (`open` / `speak`: one validation, then a FIFO queue), the requests
(`engine.serving.stream.SpeechStream`: text in, events out) and each sentence's audio path
(`engine.serving.chunker`). Admission is fair: a request over capacity waits in arrival order (told
its position, `EventKind.QUEUED`) until a stream is free — a cache slot, and room in the capacity
model and the deadline policy (`Policy.hold`) — and is refused (`EventKind.REFUSED`) only after
`Policy.max_queue_wait_s`; only a full queue refuses at once (`ServiceBusy`). A later arrival never
gets in before an earlier waiting one.

Three threads. The frontend thread cuts each stream's arriving text into sentences and phonemises
them (`TextToSpeech.plan`), so that work never delays a step. The engine thread's loop: admit from
the queue, start each stream's next sentence, plan and run one batched engine step over the chosen
streams (`engine.serving.deadlines.Policy`, `Engine.plan`), then hand what the step accepted to the
vocoder stage (`engine.serving.vocoding`), whose thread vocodes all streams' chunks in one batched
pass and sends the audio events while the engine runs its next step (`vocoder_thread=False`: the
engine thread vocodes them itself, before its next step); none of them blocks the event loop. A
failure inside one request (its text, its decoding, its vocoding) fails that request only;
cancelling (or a client disconnect) frees its cache slot at the next step, or its place in the queue.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque

import torch

from engine.decoding.plan import StepPlan
from engine.decoding.sequence import Sequence
from engine.serving.capacity import CAPACITY_MARGIN, Capacity, ServiceBusy
from engine.serving.chunker import ChunkSizes, SentenceAudio
from engine.serving.deadlines import Policy
from engine.serving.stream import Event, EventKind, SpeechStream
from engine.serving.vocoding import Frames, Note, Vocoding, Work
from engine.threads import vocoder_threads
from engine.tts import TextToSpeech
from engine.types import GenerationConfig

log = logging.getLogger("spectts.service")
__all__ = ["ServiceBusy", "TTSService"]


class TTSService:
    def __init__(self, tts: TextToSpeech, queue_size: int = 64, first_chunk_frames: int = 4,
                 chunk_frames: int = 40, policy: Policy = Policy(), prefill_chunk: int = 64,
                 row_budget: int = 64, capacity_margin: float = CAPACITY_MARGIN,
                 vocoder_thread: bool = True, vocoder_backlog_s: float = 1.0) -> None:
        """first_chunk_frames .. chunk_frames: vocoder chunk sizes (`ChunkSizes`); prefill_chunk and
        row_budget: see `engine.decoding.plan`; capacity_margin: see `Capacity`; vocoder_thread:
        vocode in a thread of its own (False: in the engine thread); vocoder_backlog_s: the audio
        the engine may hand the vocoder thread ahead of its vocoding, all streams together (at
        least one step's)."""
        self.tts = tts
        self.max_active = tts.engine.cache.max_batch
        self.chunk_sizes = ChunkSizes.for_voice(first_chunk_frames, chunk_frames, tts.hop,
                                                tts.sample_rate, tts.lookahead_samples)
        self.policy, self.prefill_chunk, self.row_budget = policy, prefill_chunk, row_budget
        self.capacity = Capacity(capacity_margin)
        self.queue_size = queue_size
        self._queue: deque[SpeechStream] = deque()  # admission order; engine thread admits
        self._queue_lock = threading.Lock()
        self._active: list[SpeechStream] = []
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="spectts-engine", daemon=True)
        self._texts: queue.SimpleQueue[SpeechStream | None] = queue.SimpleQueue()  # to phonemise
        self._frontend = threading.Thread(target=self._run_frontend, name="spectts-frontend",
                                          daemon=True)
        self.steps = 0
        # torch's intra-op threads as set where the service is built (`engine.threads`): the
        # engine thread's; the vocoder thread takes what is left of the cores (at least one)
        self.engine_threads = torch.get_num_threads()
        backlog = max(1, round(vocoder_backlog_s / self.chunk_sizes.frame_s))
        self.vocoding = Vocoding(tts, vocoder_thread, backlog,
                                 threads=vocoder_threads(self.engine_threads), wake=self.wake)
        self._work: list[Work] = []  # this loop's hand-over to the vocoder stage, in order

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self.vocoding.start()
        self._frontend.start()
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self.wake()
        self._texts.put(None)
        self.vocoding.stop()  # also frees an engine thread waiting for it
        self._thread.join(timeout=10)
        self._frontend.join(timeout=10)

    def wake(self) -> None:
        self._wake.set()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def active(self) -> int:
        return len(self._active)

    def open(self, cfg: GenerationConfig, speed: float = 1.0,
             loop: asyncio.AbstractEventLoop | None = None, voice: str | None = None
             ) -> SpeechStream:
        """A new request whose text follows (`add_text`, `end_input`); `voice`: the speaker (None:
        the voice's default). It joins the admission queue. ConfigError for a config the engine
        cannot run; ServiceBusy when the queue is full."""
        self._check(cfg)
        return self._enqueue(SpeechStream(self, cfg, speed, loop or asyncio.get_running_loop(),
                                          voice))

    def _check(self, cfg: GenerationConfig) -> None:
        """The request's one validation and the queue's room, before any work is done for it."""
        self.tts.engine.check_config(cfg)
        if len(self._queue) >= self.queue_size:
            raise ServiceBusy(f"{len(self._queue)} requests are already waiting")

    def _enqueue(self, stream: SpeechStream) -> SpeechStream:
        with self._queue_lock:
            if len(self._queue) >= self.queue_size:  # filled since _check
                raise ServiceBusy(f"{len(self._queue)} requests are already waiting")
            self._queue.append(stream)
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

    # --- the frontend thread ------------------------------------------------------------------
    def text_arrived(self, stream: SpeechStream) -> None:
        """The stream has new text or its input has ended: phonemise it off the engine thread."""
        self._texts.put(stream)

    def _run_frontend(self) -> None:
        while (stream := self._texts.get()) is not None:
            if stream.ended or stream.closed or stream.failed is not None:
                continue
            try:
                sentences, final = stream.take_sentences()
                stream.add_plans([p for text in sentences
                                  for p in self.tts.plan(text, voice=stream.voice)], final)
            except Exception as exc:  # noqa: BLE001 — this request fails (engine thread), not others
                stream.failed = exc
            self.wake()

    # --- the engine thread --------------------------------------------------------------------
    def _admit(self) -> None:
        """Admit from the queue's head while a stream is free; drop those that left; refuse those
        that waited past max_queue_wait_s; tell the rest their position."""
        now = time.perf_counter()
        # every open stream counts, also one whose text has not arrived yet (a WebSocket session
        # between its first input.text and its first sentence): counting only those decoding let
        # a burst of new sessions all in at once
        opened = [s for s in self._active if not s.ended]
        capacity = self.capacity.streams()
        with self._queue_lock:
            for stream in [s for s in self._queue if s.cancelled]:  # left while waiting
                self._queue.remove(stream)
                self._close(stream, EventKind.CANCELLED)
            reason = None
            while self._queue:
                reason = (f"all {self.max_active} streams are taken"
                          if len(opened) >= self.max_active
                          else self.policy.hold(opened, now, capacity))
                if reason is not None:
                    break
                stream = self._queue.popleft()
                stream.admitted = now
                self._active.append(stream)
                opened.append(stream)
            while self._queue and now - self._queue[0].created > self.policy.max_queue_wait_s:
                stream = self._queue.popleft()
                error = ServiceBusy(f"waited {now - stream.created:.1f} s in the queue: {reason}")
                self._close(stream, EventKind.REFUSED, error)
            for position, stream in enumerate(self._queue, 1):
                if stream.position != position:
                    stream.position = position
                    stream.emit(Event(EventKind.QUEUED, position=position))

    def _run(self) -> None:
        # OpenMP keeps the count per thread, and a new thread starts with the last one set
        # anywhere (the vocoder thread sets its own): set the engine thread's explicitly
        torch.set_num_threads(self.engine_threads)
        while not self._stop:
            self._admit()
            for stream in list(self._active):
                self._advance_input(stream)
            self._active = [s for s in self._active if not s.ended]
            running = [s for s in self._active if s.current is not None]
            if not running:
                self._handoff()
                self._wake.wait(timeout=0.05)
                self._wake.clear()
                continue
            start = time.perf_counter()
            chosen = self.policy.select(running, start)  # who runs, most urgent first
            seqs = [s.current.seq for s in chosen]
            plan = self.tts.engine.plan(seqs, self.prefill_chunk, self.row_budget)
            self._step(seqs, chosen, plan)
            decoded = self._collect([s for s in chosen if s.current is not None])
            self._handoff()  # waits while the vocoder is behind: the step's time includes that
            # the capacity model learns from decoding steps: a prompt's prefill is paid once per
            # sentence, and newcomers arriving together would make a batch look far dearer
            if not plan.prefill:
                self.capacity.record(len(chosen), time.perf_counter() - start, decoded)
            self._active = [s for s in self._active if not s.ended]
            self.steps += 1

    def _advance_input(self, stream: SpeechStream) -> None:
        """Start the stream's next sentence, finish or drop the stream."""
        try:
            if stream.cancelled:
                self._close(stream, EventKind.CANCELLED)
                return
            if stream.failed is not None:  # its text could not be phonemised, or vocoded
                self._close(stream, EventKind.ERROR, stream.failed)
                return
            if stream.current is not None:
                return
            plan, final = stream.next_plan()
            if plan is not None:
                cfg = self.tts.generation_config(plan, stream.cfg)
                seq = self.tts.engine.add(plan.prompt, cfg, self.tts.rule(plan))
                stream.current = SentenceAudio(plan, seq, stream.sentences_started,
                                               scanned=len(seq.prompt))
                stream.sentences_started += 1
                self._work.append(Note(stream, Event(EventKind.SENTENCE_START,
                                                     stream.current.index, text=plan.text)))
            elif final:
                self._close(stream, EventKind.DONE)
            elif not self.vocoding.busy(stream):  # its audio has all left: the clock may stop
                stream.playback.idle(time.perf_counter())
        except Exception as exc:  # noqa: BLE001 — this request fails, the loop goes on
            self._close(stream, EventKind.ERROR, exc)

    def _step(self, seqs: list[Sequence], streams: list[SpeechStream], plan: StepPlan) -> None:
        engine = self.tts.engine
        try:
            engine.step(seqs, plan)
        except Exception:  # noqa: BLE001 — find the request at fault: step each alone
            for seq, stream in zip(seqs, streams):
                try:
                    if not seq.finished:
                        engine.step([seq], engine.plan([seq], self.prefill_chunk, self.row_budget))
                except Exception as exc:  # noqa: BLE001
                    self._fail(stream, exc, "request failed inside the engine step")

    def _collect(self, streams: list[SpeechStream]) -> float:
        """Hand each stream's newly accepted frames to the vocoder stage (a whole chunk, or the rest
        of a sentence whose sequence has ended: its cache slot is freed now, its audio follows).
        Returns the seconds of audio the step decoded (vocoded now or later)."""
        decoded = 0.0
        for stream in streams:
            try:
                sent = stream.current
                seconds, frames = self._take(stream)
                decoded += seconds
                if sent.seq.finished:
                    stream.stats.merge(sent.seq.stats)
                    self._work.append(Frames(stream, sent.index, frames, sent.seq.stats.to_dict()))
                    self.tts.engine.release(sent.seq)
                    stream.current = None
                elif frames:
                    self._work.append(Frames(stream, sent.index, frames))
            except Exception as exc:  # noqa: BLE001
                self._fail(stream, exc, "request failed while taking its frames")
        return decoded

    def _take(self, stream: SpeechStream) -> tuple[float, list]:
        """The current sentence's seconds of newly decoded audio and the frames to vocode now."""
        playback = stream.playback
        buffered = playback.slack(time.perf_counter()) if playback.started else None
        new, frames = stream.current.take(self.tts.take_frames, stream.speed, self.chunk_sizes, buffered)
        return new * self.chunk_sizes.frame_s, frames

    def _handoff(self) -> None:
        work, self._work = self._work, []
        self.vocoding.submit(work)

    def _fail(self, stream: SpeechStream, exc: Exception, what: str) -> None:
        """Log the failure and end this stream with an error event; the others go on."""
        log.exception(what)
        self._close(stream, EventKind.ERROR, exc)

    def _close(self, stream: SpeechStream, kind: EventKind, error: Exception | None = None) -> None:
        """The engine is done with the stream: free its sequence; its final event follows its audio
        (an admitted stream's goes through the vocoder stage)."""
        if stream.current is not None:
            self.tts.engine.release(stream.current.seq)
            stream.current = None
        if stream.ended:
            return
        stream.ended = True
        if stream.admitted is None:
            stream.end(kind, error)
        else:
            self._work.append(Note(stream, Event(kind, error=error)))

    # --- convenience --------------------------------------------------------------------------
    def speak(self, text: str, cfg: GenerationConfig, speed: float = 1.0,
              loop: asyncio.AbstractEventLoop | None = None, voice: str | None = None
              ) -> SpeechStream:
        """A whole-text request, phonemised once, here (ValueError now for unspeakable text)."""
        self._check(cfg)  # before phonemising: refusals stay cheap
        stream = SpeechStream(self, cfg, speed, loop or asyncio.get_running_loop(), voice)
        stream.add_plans(self.tts.plan(text, voice=voice), final=True)  # started in order
        return self._enqueue(stream)
