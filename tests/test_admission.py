"""Admission as a fair FIFO queue, and the text frontend off the engine thread.

A request over capacity waits in arrival order, told its position, and is refused only after
`max_queue_wait_s`; one that leaves while queued leaves the queue. Phonemising arriving text runs in
the frontend thread: a slow or failing frontend never holds up the other streams' steps."""

import asyncio
import threading
import time

import pytest

from engine.serving.capacity import ServiceBusy
from engine.serving.deadlines import Policy
from engine.serving.service import TTSService
from engine.serving.stream import EventKind
from engine.tts import TextToSpeech
from engine.types import GenerationConfig

CFG = GenerationConfig(max_new_tokens=10**6, decoding="plain")
LONG = " ".join(f"Sentence number {n} keeps the engine busy for a while." for n in range(40))


@pytest.fixture(scope="module")
def tts(tiny_voice):
    return TextToSpeech(tiny_voice, max_batch=3)


def service(tts, streams: int, wait_s: float = 60.0) -> TTSService:
    """A started service that keeps `streams` streams (its capacity model says so)."""
    svc = TTSService(tts, first_chunk_frames=2, chunk_frames=5,
                     policy=Policy(max_queue_wait_s=wait_s, behind_s=1e9))
    svc.capacity.streams = lambda: streams
    svc.start()
    return svc


async def until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def events(stream) -> list:
    return [e async for e in stream.events()]


class Recorder:
    """A stream's events, gathered as they come."""

    def __init__(self, stream) -> None:
        self.stream, self.events = stream, []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for event in self.stream.events():
            self.events.append(event)

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]

    def positions(self) -> list[int]:
        return [e.position for e in self.events if e.kind == EventKind.QUEUED]


def test_queue_is_fifo_with_positions_and_leaving_frees_a_place(tts):
    """One stream at a time: later requests queue in arrival order and learn their place as it
    changes; one that leaves the queue is gone from it; admission follows arrival exactly."""
    svc = service(tts, streams=1)

    async def main():
        holder = Recorder(svc.open(CFG))  # admitted, waits for text: holds the only stream
        await until(lambda: holder.stream.admitted is not None)
        queued = [Recorder(svc.open(CFG)) for _ in range(4)]
        await until(lambda: all(r.positions() for r in queued))
        assert [r.positions() for r in queued] == [[1], [2], [3], [4]]
        queued[1].stream.cancel()  # the client leaves while queued
        await until(lambda: queued[1].kinds() == ["queued", "cancelled"])
        await until(lambda: queued[3].positions() == [4, 3])
        assert svc.waiting == 3 and queued[2].positions() == [3, 2]
        late = Recorder(svc.speak("Late.", CFG))  # arrives after them: must not get in first
        holder.stream.end_input()  # the holder ends: one stream frees at a time
        for r in (queued[0], queued[2], queued[3]):
            await until(lambda: r.stream.admitted is not None)
            assert late.stream.admitted is None
            r.stream.add_text("Short one.")
            r.stream.end_input()
        await asyncio.gather(*(r.task for r in (holder, *queued, late)))
        return holder, queued, late

    try:
        holder, queued, late = asyncio.run(main())
    finally:
        svc.stop()
    served = [queued[0], queued[2], queued[3], late]
    assert all(r.kinds()[-1] == "done" for r in served)
    admitted = [r.stream.admitted for r in served]
    assert admitted == sorted(admitted)  # FIFO
    assert queued[1].stream.admitted is None  # it left before its turn: never took a stream
    assert late.positions()[0] == 4 and late.stream.summary()["queue_wait_seconds"] > 0
    assert svc.waiting == 0 and tts.engine.cache.slots_in_use == 0


def test_fifo_under_churn(tts):
    """Many short requests at once over two streams: every one is served, in arrival order."""
    svc = service(tts, streams=2)

    async def main():
        streams = [svc.speak(f"Request {i} is here.", CFG) for i in range(9)]
        ends = await asyncio.gather(*(events(s) for s in streams))
        return streams, [e[-1].kind for e in ends]

    try:
        streams, ends = asyncio.run(main())
    finally:
        svc.stop()
    assert ends == ["done"] * 9
    admitted = [s.admitted for s in streams]
    assert admitted == sorted(admitted)


def test_refused_only_after_the_queue_wait(tts):
    svc = service(tts, streams=1, wait_s=0.4)

    async def main():
        holder = svc.open(CFG)  # holds the stream, never sends text
        await until(lambda: holder.admitted is not None)
        start = time.perf_counter()
        waiting = Recorder(svc.open(CFG))
        await waiting.task
        holder.cancel()
        return waiting, time.perf_counter() - start

    try:
        waiting, elapsed = asyncio.run(main())
    finally:
        svc.stop()
    assert waiting.kinds() == ["queued", "refused"]
    assert elapsed >= 0.4
    refused = waiting.events[-1]
    assert isinstance(refused.error, ServiceBusy) and "waited" in str(refused.error)
    assert refused.stats["queue_wait_seconds"] >= 0.4


def test_a_full_queue_refuses_at_once(tts):
    svc = TTSService(tts, queue_size=2)  # not started: nothing leaves the queue

    async def main():
        svc.open(CFG), svc.open(CFG)
        with pytest.raises(ServiceBusy, match="2 requests are already waiting"):
            svc.open(CFG)

    asyncio.run(main())


def test_the_engine_thread_never_phonemises(tts, monkeypatch):
    """Text arriving while another stream decodes is phonemised in the frontend thread: a plan
    that takes a second does not stop the other stream's steps meanwhile."""
    svc = service(tts, streams=3)
    plan, threads, steps_during = tts.plan, set(), []

    def slow_plan(text, *args, **kwargs):
        threads.add(threading.current_thread().name)
        if "slow" in text:
            before = svc.steps
            time.sleep(1.0)
            steps_during.append(svc.steps - before)
        return plan(text, *args, **kwargs)

    monkeypatch.setattr(tts, "plan", slow_plan)

    async def main():
        busy = svc.open(CFG)
        busy.add_text(LONG)
        busy.end_input()
        async for event in busy.events():
            if event.kind == EventKind.AUDIO:
                break
        late = svc.open(CFG)
        late.add_text("This one is slow to phonemise. ")
        late.end_input()
        late_kinds = [e.kind async for e in late.events()]
        busy.cancel()
        [e async for e in busy.events()]
        return late_kinds

    try:
        late_kinds = asyncio.run(main())
    finally:
        svc.stop()
    assert late_kinds[-1] == "done"
    assert "spectts-engine" not in threads and "spectts-frontend" in threads
    assert steps_during and steps_during[0] > 0  # the busy stream kept stepping
    assert tts.engine.cache.slots_in_use == 0


def test_a_frontend_failure_fails_that_request_only(tts, monkeypatch):
    svc = service(tts, streams=3)
    plan = tts.plan

    def failing_plan(text, *args, **kwargs):
        if "unspeakable" in text:
            raise ValueError("the frontend cannot speak this")
        return plan(text, *args, **kwargs)

    monkeypatch.setattr(tts, "plan", failing_plan)

    async def main():
        good, bad = svc.open(CFG), svc.open(CFG)
        good.add_text("This one works. And so does this.")
        bad.add_text("This is unspeakable. ")
        good.end_input(), bad.end_input()
        return await asyncio.gather(events(good), events(bad))

    try:
        good, bad = asyncio.run(main())
    finally:
        svc.stop()
    assert good[-1].kind == "done" and sum(e.kind == "audio" for e in good) > 0
    assert bad[-1].kind == "error" and "cannot speak this" in str(bad[-1].error)
    assert tts.engine.cache.slots_in_use == 0
