"""The vocoder stage in its own thread: each stream's events keep their order and its audio equals
offline synthesis; cancelling mid-vocoding frees everything; a vocoder failure fails one stream;
the engine never runs further ahead of the vocoder than the backlog bound.

Test doubles wrap the voice's real `push_many` (a gate that holds the vocoder thread, a failure
after the real pass); nothing here passes or fails on timing, only on generous timeouts."""

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from engine.serving.chunker import ChunkSizes
from engine.serving.deadlines import Policy
from engine.serving.service import TTSService
from engine.threads import vocoder_threads
from engine.tts import TextToSpeech
from engine.types import GenerationConfig

TEXTS = ["Hello there. How are you today?", "The train leaves at 6:15 tomorrow!",
         "One more sentence, with a comma. And a short one.", "Numbers: 42 and 7.",
         "A longer sentence that keeps the engine busy for a little while."]
DECODINGS = ["heads", "plain", "draft"]
LONG = " ".join(f"Sentence number {n} keeps the vocoder busy for a while." for n in range(8))


@pytest.fixture(scope="module")
def tts(tiny_voice):
    return TextToSpeech(tiny_voice, max_batch=3)


def cfg(i: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=10**6, decoding=DECODINGS[i % len(DECODINGS)])


def started(tts, **kwargs) -> TTSService:
    svc = TTSService(tts, queue_size=64, first_chunk_frames=2, chunk_frames=5,
                     policy=Policy(max_queue_wait_s=1e9, behind_s=1e9, adaptive=False), **kwargs)
    svc.start()
    return svc


async def collect(stream) -> tuple[list, np.ndarray]:
    events = [e async for e in stream.events()]
    audio = [e.audio for e in events if e.kind == "audio"]
    return events, (np.concatenate(audio) if audio else np.zeros(0, np.float32))


async def until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def assert_in_order(events: list) -> None:
    """Its place in the queue while it waits; then per sentence, in order: its start, its audio,
    its end; then the final `done`."""
    kinds = [e.kind for e in events]
    assert kinds[-1] == "done" and "done" not in kinds[:-1]
    waited = next(i for i, k in enumerate(kinds) if k != "queued")
    sentence, state = -1, "between"
    for e in events[waited:-1]:
        if e.kind == "sentence_start":
            assert state == "between" and e.sentence_index == sentence + 1, kinds
            sentence, state = e.sentence_index, "open"
        else:
            assert e.kind in ("audio", "sentence_done") and state == "open", kinds
            assert e.sentence_index == sentence, kinds
            state = "between" if e.kind == "sentence_done" else state
    assert state == "between"


def wrap_push(monkeypatch, tts, before=None, after=None) -> list:
    """Replace tts.push_many by the real one with hooks; returns the calls' (thread name, torch
    threads, decoders)."""
    real, calls = tts.push_many, []

    def push_many(decoders, frames):
        calls.append((threading.current_thread().name, torch.get_num_threads(), list(decoders)))
        if before:
            before(decoders)
        out = real(decoders, frames)
        if after:
            after(decoders)
        return out

    monkeypatch.setattr(tts, "push_many", push_many)
    return calls


@pytest.mark.parametrize("vocoder_thread", [True, False])
def test_many_streams_keep_their_order_and_offline_audio(vocoder_thread, tts, monkeypatch):
    """Ten streams over three cache slots, mixed decodings: every stream's events come in order
    and its audio equals offline synthesis of its text; the vocoding ran in the vocoder thread
    (or the engine's) with the vocoder's torch thread count."""
    calls = wrap_push(monkeypatch, tts, before=lambda _: time.sleep(0.002))  # let work queue up
    svc = started(tts, vocoder_thread=vocoder_thread)

    async def main():
        streams = [svc.speak(TEXTS[i % len(TEXTS)], cfg(i)) for i in range(10)]
        return await asyncio.gather(*(collect(s) for s in streams))

    try:
        results = asyncio.run(main())
    finally:
        svc.stop()
    for i, (events, audio) in enumerate(results):
        assert_in_order(events)
        offline = tts.synthesize(TEXTS[i % len(TEXTS)], cfg(i)).audio
        assert len(audio) == len(offline) and np.abs(audio - offline).max() < 1e-4, i
    assert calls and {name for name, _, _ in calls} == \
        {"spectts-vocoder" if vocoder_thread else "spectts-engine"}
    if vocoder_thread:
        assert {n for _, n, _ in calls} == {svc.vocoding.threads}
    assert tts.engine.cache.slots_in_use == 0 and tts.engine.draft_cache.slots_in_use == 0
    assert svc.active == 0 and svc.vocoding.streams == 0 and svc.vocoding.backlog == 0


def test_cancel_while_vocoding_frees_everything(tts, monkeypatch):
    """The vocoder thread is held while a stream's frames wait for it; the stream is cancelled:
    it ends `cancelled`, its slot, its decoder and its backlog are freed, and the service then
    serves as many streams at once as before."""
    gate = threading.Event()
    wrap_push(monkeypatch, tts, before=lambda _: gate.wait(60))
    svc = started(tts)
    try:
        async def main():
            stream = svc.speak(LONG, cfg(1))
            await until(lambda: svc.vocoding.backlog > 0)  # frames handed over, not vocoded
            stream.cancel()
            gate.set()
            kinds = [e.kind async for e in stream.events()]
            await until(lambda: svc.active == 0 and svc.vocoding.streams == 0)
            assert tts.engine.cache.slots_in_use == 0 and svc.vocoding.backlog == 0
            full = [svc.speak(TEXTS[i], cfg(i)) for i in range(tts.engine.cache.max_batch)]
            return kinds, await asyncio.gather(*(collect(s) for s in full))

        kinds, full = asyncio.run(main())
    finally:
        gate.set()
        svc.stop()
    assert kinds[-1] == "cancelled" and "done" not in kinds
    assert all(events[-1].kind == "done" for events, _ in full)
    assert tts.engine.cache.slots_in_use == 0 and svc.vocoding.streams == 0


def test_a_vocoder_failure_fails_that_stream_only(tts, monkeypatch):
    """The vocoder raises for one stream's decoder after its real pass has changed every decoder
    in it: that stream ends with the error, the others' audio still equals offline synthesis
    (their pass is retried from its state before), and the service goes on serving."""
    svc = started(tts)
    bad = {}

    def fail_for_bad(decoders):
        if any(d is svc.vocoding._decoders.get(bad.get("stream")) for d in decoders):
            raise RuntimeError("the vocoder broke on this stream")

    wrap_push(monkeypatch, tts, after=fail_for_bad)
    try:
        async def main():
            good = [svc.speak(TEXTS[0], cfg(0)), svc.speak(TEXTS[1], cfg(1))]
            bad["stream"] = svc.speak(TEXTS[2], cfg(2))
            results = await asyncio.gather(*(collect(s) for s in [*good, bad["stream"]]))
            later = await collect(svc.speak(TEXTS[3], cfg(3)))
            return results, later

        (g0, g1, b), later = asyncio.run(main())
    finally:
        svc.stop()
    assert b[0][-1].kind == "error" and "broke on this stream" in str(b[0][-1].error)
    for i, (events, audio) in enumerate([g0, g1]):
        assert_in_order(events)
        offline = tts.synthesize(TEXTS[i], cfg(i)).audio
        assert len(audio) == len(offline) and np.abs(audio - offline).max() < 1e-4
    assert_in_order(later[0])
    assert tts.engine.cache.slots_in_use == 0 and svc.active == 0 and svc.vocoding.streams == 0


def test_the_engine_runs_at_most_the_backlog_ahead(tts, monkeypatch):
    """With the vocoder thread held, the engine hands over frames until the backlog bound and then
    waits; released, everything completes, and the frames handed over and not yet vocoded never
    exceeded the bound (one step's frames, here at most 3 streams x the first chunk, fit in it)."""
    gate, seen = threading.Event(), []
    sizes = ChunkSizes.for_voice(2, 2, tts.hop, tts.sample_rate, tts.lookahead_samples)
    step_max = tts.engine.cache.max_batch * sizes.size(0)  # the largest step's hand-over
    bound = step_max + 2
    svc = TTSService(tts, queue_size=64, first_chunk_frames=2, chunk_frames=2,
                     policy=Policy(max_queue_wait_s=1e9, behind_s=1e9, adaptive=False),
                     vocoder_backlog_s=bound * sizes.frame_s)
    assert svc.vocoding.max_backlog_frames == bound

    def hold(_):
        seen.append(svc.vocoding.backlog)
        gate.wait(60)

    wrap_push(monkeypatch, tts, before=hold)
    plain = GenerationConfig(max_new_tokens=10**6, decoding="plain")  # one token per step
    svc.start()
    try:
        async def main():
            streams = [svc.speak(LONG, plain) for _ in range(tts.engine.cache.max_batch)]
            await until(lambda: svc.vocoding.held > 0)  # the engine waits for the vocoder
            steps = svc.steps
            await asyncio.sleep(0.2)
            assert svc.steps == steps  # and stays held
            gate.set()
            return await asyncio.gather(*(collect(s) for s in streams))

        results = asyncio.run(main())
    finally:
        gate.set()
        svc.stop()
    offline = tts.synthesize(LONG, plain).audio
    for events, audio in results:
        assert_in_order(events)
        assert len(audio) == len(offline) and np.abs(audio - offline).max() < 1e-4
    assert max(seen) <= bound and svc.vocoding.peak_backlog <= bound
    assert svc.vocoding.peak_backlog > bound - step_max  # it waited only when the next won't fit


@pytest.mark.parametrize("engine, cores, expected", [(1, 2, 1), (2, 2, 1), (1, 1, 1), (4, 16, 4),
                                                     (8, 10, 2), (3, 4, 1)])
def test_the_vocoder_thread_takes_the_cores_the_engine_leaves(engine, cores, expected):
    assert vocoder_threads(engine, cores) == expected
