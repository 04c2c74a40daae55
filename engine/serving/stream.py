"""One request of the speech service: its text in, its events out.

A `SpeechStream` is one HTTP call or one WebSocket session: text arrives whole or in pieces
(`add_text`, then `end_input`); the service's frontend thread cuts it into complete sentences
(`take_sentences`) and phonemises them into `queued` plans (`add_plans`); the engine thread takes them
one at a time (`next_plan`) and sends `Event`s back through an asyncio queue (`emit`, `events`). Until
admitted, a stream waits in the service's queue (`position`).
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

import numpy as np

from engine.serving.chunker import SentenceAudio
from engine.serving.deadlines import Playback
from engine.tts import SentencePlan
from engine.types import GenerationConfig, GenerationStats

if TYPE_CHECKING:
    from engine.serving.service import TTSService

_SENTENCE_END = re.compile(r"[.!?;:][\"')\]]*\s+$|\n\s*$")


class EventKind(StrEnum):
    QUEUED = "queued"  # waiting for a free stream, at Event.position (1: next); sent as it changes
    SENTENCE_START = "sentence_start"  # a sentence's decoding began (Event.text)
    AUDIO = "audio"  # a chunk of its audio (Event.audio)
    SENTENCE_DONE = "sentence_done"  # its audio is complete (Event.stats)
    DONE = "done"  # the request is complete (Event.stats): final
    ERROR = "error"  # the request failed (Event.error): final
    CANCELLED = "cancelled"  # the client cancelled or left: final
    REFUSED = "refused"  # waited max_queue_wait_s in the queue (Event.error: ServiceBusy): final


FINAL = (EventKind.DONE, EventKind.ERROR, EventKind.CANCELLED, EventKind.REFUSED)


@dataclass
class Event:
    kind: EventKind
    sentence_index: int = -1
    audio: np.ndarray | None = None  # float32 mono, for AUDIO
    text: str = ""  # the sentence, for SENTENCE_START
    stats: dict | None = None  # for SENTENCE_DONE and DONE
    error: Exception | None = None  # for ERROR and REFUSED
    position: int = 0  # for QUEUED


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
        self._planned_all = False  # the input has ended and all of it is in `queued`
        self._planning = 0  # characters taken by the frontend thread, not yet in `queued`
        self.failed: Exception | None = None  # its text could not be phonemised, or vocoded
        self.cancelled = False
        self.ended = False  # the engine thread is done with it (its final event may follow)
        self.closed = False  # a final event (done / error / cancelled) was sent
        self.created = time.perf_counter()
        self.admitted: float | None = None  # when it left the queue for a stream
        self.position: int | None = None  # its place in the queue, as last told (QUEUED)
        self.playback = Playback(self.created)  # the listener's clock: deadlines and underruns
        self.first_audio: float | None = None  # seconds from creation to the first audio chunk
        self.audio_seconds = 0.0
        self.stats = GenerationStats()
        self.sentences_started = 0
        self.current: SentenceAudio | None = None  # the sentence being decoded
        self.queued: list[SentencePlan] = []  # split, phonemised, not started

    # --- client side --------------------------------------------------------------------------
    def add_text(self, text: str) -> None:
        with self._lock:
            self._text += text
        self.service.text_arrived(self)

    def end_input(self) -> None:
        with self._lock:
            self._input_done = True
        self.service.text_arrived(self)

    def unspoken_chars(self) -> int:
        """Characters received and not yet spoken: text not yet cut into sentences, sentences
        waiting, and the one being spoken. A session's memory follows this, not its total text."""
        with self._lock:
            current = self.current
            return (len(self._text) + self._planning + sum(len(p.text) for p in self.queued)
                    + (len(current.plan.text) if current is not None else 0))

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
        if event.kind == EventKind.AUDIO and self.first_audio is None:
            self.first_audio = time.perf_counter() - self.created
        if event.kind in FINAL:
            self.closed = True
        try:
            self.loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (client side shut down)
            self.cancelled = True

    def end(self, kind: EventKind, error: Exception | None = None) -> None:
        """Send the final event `kind`: with the request's summary, but for an error."""
        self.emit(Event(kind, error=error,
                        stats=None if kind == EventKind.ERROR else self.summary()))

    def add_plans(self, plans: list[SentencePlan], final: bool) -> None:
        """Phonemised sentences, in order (the frontend thread); `final`: the input has ended and
        these are its last."""
        with self._lock:
            self.queued.extend(plans)
            self._planning = 0
            self._input_done = self._input_done or final
            self._planned_all = final

    def next_plan(self) -> tuple[SentencePlan | None, bool]:
        """The next sentence to start (None: none yet), and whether the input is over with none
        left (the engine thread)."""
        with self._lock:
            if self.queued:
                return self.queued.pop(0), False
            return None, self._planned_all

    @property
    def queue_wait(self) -> float | None:
        """Seconds spent in the service's queue (None while still there)."""
        return None if self.admitted is None else self.admitted - self.created

    def take_sentences(self) -> tuple[list[str], bool]:
        """Complete sentences received so far, and whether the input has ended with none left."""
        from models.voices.frontend import split_sentences

        with self._lock:
            text, final = self._text, self._input_done
            if not text.strip():
                self._text = ""
                return [], final
            pieces = split_sentences(text)
            if final or _SENTENCE_END.search(text):
                self._text = ""
                self._planning = len(text)
                return pieces, final
            if len(pieces) <= 1:
                return [], False
            # the unfinished sentence waits for more text; keep its trailing space, or the next
            # word would be glued to its last one
            self._text = pieces[-1] + (" " if text[-1].isspace() else "")
            self._planning = len(text) - len(self._text)
            return pieces[:-1], False

    def summary(self) -> dict:
        wall = time.perf_counter() - self.created
        return {**self.stats.to_dict(), "audio_seconds": self.audio_seconds,
                "queue_wait_seconds": self.queue_wait if self.admitted else wall,
                "time_to_first_audio_seconds": self.first_audio, "wall_seconds": wall,
                "max_underrun_seconds": self.playback.max_underrun,
                "total_underrun_seconds": self.playback.total_underrun,
                "real_time_factor": wall / self.audio_seconds if self.audio_seconds else None}
