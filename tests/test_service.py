"""The speech service: streamed audio equals offline synthesis; cancel, failures and a full queue."""

import asyncio

import numpy as np
import pytest

import random

from engine.serving.deadlines import Policy
from engine.serving.service import ServiceBusy, TTSService
from engine.serving.stream import FINAL
from engine.tts import TextToSpeech, stretch
from engine.types import GenerationConfig

CFG = GenerationConfig(max_new_tokens=10**6, decoding="heads")


@pytest.fixture(scope="module")
def tts(tiny_voice):
    return TextToSpeech(tiny_voice, max_batch=3)


@pytest.fixture(scope="module")
def tts_frontend(tiny_voice):
    """The same voice with espeak-ng's phoneme durations forced."""
    return TextToSpeech(tiny_voice, max_batch=3, phoneme_durations="frontend")


def started(tts) -> TTSService:
    svc = TTSService(tts, queue_size=2, first_chunk_frames=2, chunk_frames=5,
                     policy=Policy(adaptive=False))  # behaviour, not capacity
    svc.start()
    return svc


@pytest.fixture()
def service(tts):
    svc = started(tts)
    yield svc
    svc.stop()


async def collect(stream):
    events = [e async for e in stream.events()]
    audio = [e.audio for e in events if e.kind == "audio"]
    return events, (np.concatenate(audio) if audio else np.zeros(0, np.float32))


@pytest.mark.parametrize("durations", ["model", "frontend"])
def test_streamed_audio_equals_offline(durations, tts, tts_frontend):
    text = "Hello there. The train leaves at 6:15 tomorrow! Goodbye."
    tts = tts if durations == "model" else tts_frontend
    service = started(tts)

    async def main():
        return await collect(service.speak(text, CFG))

    try:
        events, audio = asyncio.run(main())
    finally:
        service.stop()
    offline = tts.synthesize(text, CFG).audio
    assert len(audio) == len(offline)
    assert np.abs(audio - offline).max() < 1e-4
    kinds = [e.kind for e in events]
    assert kinds[-1] == "done" and kinds.count("sentence_start") == 3
    assert kinds.count("audio") > 3  # chunks, not one blob per sentence
    stats = events[-1].stats
    assert stats["time_to_first_audio_seconds"] > 0 and stats["audio_seconds"] > 0
    assert tts.engine.cache.slots_in_use == 0


def test_text_in_pieces_gives_the_same_audio(service):
    text = "Speak this sentence now. And then this one."

    async def main():
        whole = await collect(service.speak(text, CFG))
        stream = service.open(CFG)
        for word in text.split(" "):
            stream.add_text(word + " ")
            await asyncio.sleep(0)
        stream.end_input()
        return whole, await collect(stream)

    (_, a), (events, b) = asyncio.run(main())
    assert len(a) == len(b) and np.abs(a - b).max() < 1e-4  # chunking follows the listener's buffer
    assert [e.text for e in events if e.kind == "sentence_start"] == \
        ["Speak this sentence now.", "And then this one."]


def test_cancel_frees_the_slot(service, tts):
    async def main():
        stream = service.speak(" ".join(["A long sentence to be cut short."] * 6), CFG)
        async for event in stream.events():
            if event.kind == "audio":
                stream.cancel()
            last = event
        return last

    last = asyncio.run(main())
    assert last.kind == "cancelled"
    assert tts.engine.cache.slots_in_use == 0


def test_a_failing_request_does_not_stop_others(service, tts):
    async def main():
        good = service.speak("This one works fine.", CFG)
        bad = service.open(CFG)
        bad.add_text("Fine text, ")
        bad.queued.append(object())  # a broken plan: fails inside the engine thread
        bad.end_input()
        return await asyncio.gather(collect(good), collect(bad))

    (good_events, good_audio), (bad_events, _) = asyncio.run(main())
    assert good_events[-1].kind == "done" and len(good_audio) > 0
    assert bad_events[-1].kind == "error"
    assert tts.engine.cache.slots_in_use == 0


def test_full_queue_is_refused(tts):
    svc = TTSService(tts, queue_size=1)  # not started: nothing leaves the queue

    async def main():
        svc.speak("One.", CFG)
        with pytest.raises(ServiceBusy):
            svc.speak("Two.", CFG)

    asyncio.run(main())


def test_sessions_waiting_for_text_count_against_capacity(tts):
    """A WebSocket session is open before its first sentence is complete: a burst of such sessions
    must not all be admitted because none of them is decoding yet; the one over waits its turn."""
    svc = TTSService(tts, policy=Policy())
    svc.capacity.streams = lambda: 2  # this machine keeps two streams real-time
    svc.start()

    async def main():
        streams = [svc.open(CFG), svc.open(CFG)]  # no text yet
        deadline = asyncio.get_running_loop().time() + 10
        while svc.waiting:  # the engine thread has taken both: neither is queued nor decoding
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        assert svc.active == 2
        third = svc.open(CFG)
        events = third.events()
        queued = await anext(events)
        assert queued.kind == "queued" and queued.position == 1 and third.admitted is None
        for stream in streams:
            stream.cancel()
            [e async for e in stream.events()]
        while third.admitted is None:  # a stream is free: the queue's head gets it
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        third.cancel()
        assert [e.kind async for e in events] == ["cancelled"]

    try:
        asyncio.run(main())
    finally:
        svc.stop()
    assert tts.engine.cache.slots_in_use == 0


def test_many_streams_with_random_cancels_leak_nothing(tts):
    """A small soak: more streams than slots, mixed decodings, a third cancelled at random times;
    every stream ends, the uncancelled ones done, and every cache slot is free afterwards."""
    svc = TTSService(tts, queue_size=64, first_chunk_frames=2, chunk_frames=5,
                     policy=Policy(max_queue_wait_s=1e9, behind_s=1e9, adaptive=False))
    svc.start()
    rng = random.Random(0)
    texts = ["Hello there.", "A second, longer sentence to speak. And one more.", "Numbers: 42."]
    decodings = ["heads", "draft", "plain"]

    async def one(i):
        cfg = GenerationConfig(max_new_tokens=10**6, decoding=decodings[i % 3])
        stream = svc.speak(texts[i % 3], cfg)
        cancel = rng.random() < 0.35
        if cancel:
            asyncio.get_running_loop().call_later(rng.uniform(0, 0.3), stream.cancel)
        kinds = [e.kind async for e in stream.events()]
        return cancel, kinds[-1]

    async def main():
        return await asyncio.gather(*(one(i) for i in range(24)))

    try:
        ends = asyncio.run(main())
    finally:
        svc.stop()
    assert all(end in FINAL for _, end in ends)
    assert all(end == "done" for cancelled, end in ends if not cancelled)
    assert any(end == "cancelled" for _, end in ends)
    assert tts.engine.cache.slots_in_use == 0 and tts.engine.draft_cache.slots_in_use == 0
    assert svc.active == 0 and svc.waiting == 0


def test_bad_config_is_refused_before_queueing(service):
    async def main():
        with pytest.raises(ValueError):
            service.speak("Hello.", GenerationConfig(decoding="nope"))
        with pytest.raises(ValueError):
            service.speak("   ", CFG)

    asyncio.run(main())


@pytest.mark.parametrize("speed", [0.5, 1.0, 1.5, 3.0])
def test_stretch_changes_length_by_speed(speed):
    frames = list(range(100))
    out, done = stretch(frames[:37], speed, 0)
    more, done = stretch(frames, speed, done)
    assert out + more == stretch(frames, speed, 0)[0]
    assert abs(len(out + more) - 100 / speed) <= 1


def test_words_split_across_pieces_stay_apart(tts):
    svc = TTSService(tts)  # not started: only the text buffer is exercised

    async def main():
        stream = svc.open(CFG)
        stream.add_text("One. Two three ")
        first, _ = stream.take_sentences()
        stream.add_text("four.")
        stream.end_input()
        return first, stream.take_sentences()[0]

    first, rest = asyncio.run(main())
    assert first == ["One."] and rest == ["Two three four."]


@pytest.mark.parametrize("sample_rate, hop", [(24000, 480), (16000, 320), (24000, 2048)])
def test_chunk_sizes_cover_their_20ms_units_in_the_voices_frames(sample_rate, hop):
    """Chunk sizes are set in 20 ms units: a voice with 20 ms frames keeps them as they are, one
    with longer frames (SNAC's 2048 samples at 24 kHz) takes the fewest whole frames that cover as
    much audio."""
    from engine.serving.chunker import ChunkSizes

    for units in (1, 4, 7, 40):
        sizes = ChunkSizes.for_voice(units, units, hop, sample_rate, lookahead_samples=hop)
        frame_s = hop / sample_rate
        assert sizes.frame_s == frame_s and sizes.lookahead_frames == 1
        frames = sizes.first_chunk_frames
        assert frames * frame_s >= units * 0.02 - 1e-9  # covers the audio asked for
        assert frames == 1 or (frames - 1) * frame_s < units * 0.02  # with no frame to spare
        if hop * 50 == sample_rate:
            assert frames == units
