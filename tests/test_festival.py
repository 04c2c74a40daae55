"""The Festival worker: phones and audio of one text do not depend on others, hangs and deaths fail
one request with a clear error and the next request works."""

import numpy as np
import pytest

from models.voices import festival as fest

pytestmark = pytest.mark.skipif(not fest.available(), reason="Festival + festvox-us-slt-hts not installed")


@pytest.fixture(scope="module")
def worker():
    with fest.Festival(sample_rate=22050, timeout_s=10) as f:
        yield f


def test_front_end_phones_match_the_synthesised_ones(worker):
    text = "Is the record player really broken?"
    front, synth = worker.phones(text), worker.synthesize(text)
    assert front.phones == synth.phones
    assert synth.phones[0] == "pau" and synth.phones[-1] == "pau?"
    assert {"r", "eh1^", "k", "er0", "d"} <= set(synth.phones)  # stress and accent marks on vowels
    assert set(synth.phones) <= set(fest.FESTIVAL_PHONES)


def test_durations_cover_the_audio(worker):
    utt = worker.synthesize("Dr. Smith paid $3.50 on May 5th.")
    frames = utt.frame_durations(441, 22050)
    assert len(frames) == len(utt.phones)
    assert int(frames.sum()) == len(utt.audio) // 441 and frames.min() >= 0
    assert 2.0 < len(utt.audio) / 22050 < 6.0  # "Doctor Smith paid three dollars fifty ..."
    assert abs(utt.ends[-1] - len(utt.audio) / 22050) < 0.02


def test_a_text_sounds_the_same_whatever_came_before(worker):
    first = worker.synthesize("Another test sentence.").audio
    worker.synthesize("Something else entirely, and rather longer than the first one!")
    assert np.array_equal(first, worker.synthesize("Another test sentence.").audio)


def test_quotes_backslashes_and_accents_are_read(worker):
    assert fest.fold("Café naïve résumé ☃\x07") == "Cafe naive resume"
    utt = worker.phones(fest.fold('He said "stop\\now" at the café.'))
    assert "pau" in utt.phones and len(utt.phones) > 10
    assert worker.synthesize("").phones == [] and worker.synthesize(fest.fold("☃")).phones == []


def test_a_failing_request_raises_and_the_worker_goes_on(worker):
    with pytest.raises(fest.FestivalError):
        worker._request("(car 5)")  # a Scheme error inside the request
    assert worker.phones("Still here.").phones[-1] == "pau"


def test_a_hang_times_out_and_the_worker_is_restarted():
    with fest.Festival(timeout_s=1.0) as f:
        assert f.phones("Warm up.").phones
        with pytest.raises(fest.FestivalError, match="longer than"):
            f._request("(while t nil)")
        assert f.restarts == 1
        assert f.phones("After the hang.").phones[-1] == "pau"


def test_a_killed_process_is_restarted():
    with fest.Festival(timeout_s=5.0) as f:
        f.phones("One.")
        f._proc.kill()
        f._proc.wait()
        assert f.phones("Two.").phones[-1] == "pau"


def test_a_festival_voice_speaks_through_text_to_speech(tmp_path):
    from engine.tts import TextToSpeech
    from engine.types import GenerationConfig
    from models.recipes.random_voice import build_random_voice

    tts = TextToSpeech(build_random_voice(tmp_path / "v", frontend="festival"))
    plans = tts.plan("Is it ready? Yes, at 6:15.")
    assert len(plans) == 2
    names = tts.phoneme_vocab.from_ids(plans[0].phonemes)
    assert names[-1] == "pau?" and plans[0].durations is None  # the LM ends its phones
    speech = tts.synthesize("Hello there.", GenerationConfig(max_new_tokens=10**6))
    assert speech.sample_rate == 22050 and len(speech.audio) > 0
    for text in ("", "   ", "☃☃", "\x07"):
        with pytest.raises(ValueError):
            tts.plan(text)


def test_a_hung_frontend_fails_that_request_only(tmp_path):
    from engine.tts import TextToSpeech
    from models.recipes.random_voice import build_random_voice

    tts = TextToSpeech(build_random_voice(tmp_path / "v", frontend="festival"))
    tts.phonemizer.festival.timeout_s = 1.0
    real = tts.phonemizer.festival.phones
    tts.phonemizer.festival.phones = lambda text: tts.phonemizer.festival._request("(while t nil)")
    with pytest.raises(ValueError, match="frontend could not read"):
        tts.plan("This one hangs.")
    tts.phonemizer.festival.phones = real
    assert tts.plan("The next one is fine.")
