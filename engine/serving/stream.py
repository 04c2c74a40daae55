"""One request of the speech service: its text in, its events out.

A `SpeechStream` is one HTTP call or one WebSocket session: text arrives whole or in pieces
(`add_text`, then `end_input`) and is cut into complete sentences (`take_sentences`); the engine thread
sends `Event`s back through an asyncio queue (`emit`, `events`).
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
    SENTENCE_START = "sentence_start"  # a sentence's decoding began (Event.text)
    AUDIO = "audio"  # a chunk of its audio (Event.audio)
    SENTENCE_DONE = "sentence_done"  # its audio is complete (Event.stats)
    DONE = "done"  # the request is complete (Event.stats): final
    ERROR = "error"  # the request failed (Event.error): final
    CANCELLED = "cancelled"  # the client cancelled or left: final


FINAL = (EventKind.DONE, EventKind.ERROR, EventKind.CANCELLED)


@dataclass
class Event:
    kind: EventKind
    sentence_index: int = -1
    audio: np.ndarray | None = None  # float32 mono, for AUDIO
    text: str = ""  # the sentence, for SENTENCE_START
    stats: dict | None = None  # for SENTENCE_DONE and DONE
    error: Exception | None = None  # for ERROR


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
        self.closed = False  # a final event (done / error / cancelled) was sent
        self.created = time.perf_counter()
        self.playback = Playback(self.created)  # the listener's clock: deadlines and underruns
        self.first_audio: float | None = None  # seconds from creation to the first audio chunk
        self.audio_seconds = 0.0
        self.stats = GenerationStats()
        self.sentences_started = 0
        self.current: SentenceAudio | None = None  # the sentence being decoded
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
        if event.kind == EventKind.AUDIO and self.first_audio is None:
            self.first_audio = time.perf_counter() - self.created
        if event.kind in FINAL:
            self.closed = True
        try:
            self.loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (client side shut down)
            self.cancelled = True

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
