"""`spectts serve --bundle DIR --codec DIR` on a random Orpheus-layout checkpoint and SNAC 24 kHz:
the app loads it as shipped (warm-up included), speaks over HTTP (file, stream) and WebSocket with
Orpheus's voices, lists them, answers bad voices with a 400 naming them; `spectts synth` and a
server that refuses a broken checkpoint with one line."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys

import httpx
import numpy as np
import pytest
import soundfile

pytest.importorskip("snac")
websockets = pytest.importorskip("websockets")

from server.cli import main as spectts  # noqa: E402
from engine.orpheus_tts import OrpheusTTS  # noqa: E402
from server.app import create_app  # noqa: E402
from server.audio import pcm16  # noqa: E402
from server.settings import Settings  # noqa: E402
from server.speech import default_config  # noqa: E402
from tests.test_server import LiveServer  # noqa: E402

MAX_LEN = 100  # a short cache: random weights never end their speech, so each sentence is capped


@pytest.fixture(scope="module")
def settings(orpheus_dirs):
    ckpt, codec, _ = orpheus_dirs
    return Settings(bundle=ckpt, codec=codec, device="cpu", threads=1, decoding="plain",
                    temperature=0.0, max_batch=2, max_len=MAX_LEN, admission_control=False)


@pytest.fixture(scope="module")
def live(settings):
    with LiveServer(create_app(settings)) as server:
        server.wait_ready(timeout=120)
        yield server


@pytest.fixture(scope="module")
def client(live):
    with httpx.Client(base_url=live.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def reference(orpheus_dirs, settings):
    ckpt, codec, _ = orpheus_dirs
    tts = OrpheusTTS(ckpt, codec, max_batch=2, max_len=MAX_LEN)
    cfg = default_config(settings, tts)

    def pcm(text: str, voice: str | None = None) -> np.ndarray:
        return np.frombuffer(pcm16(tts.synthesize(text, cfg, voice=voice).audio), "<i2")
    return pcm


def assert_same_pcm(got: np.ndarray, expected: np.ndarray) -> None:
    """Streamed SNAC audio equals offline to float rounding: at most one PCM16 step apart."""
    assert len(got) == len(expected) and len(got) % 2048 == 0
    assert np.abs(got.astype(np.int32) - expected.astype(np.int32)).max() <= 1


def test_wav_with_a_voice_equals_offline(client, reference):
    r = client.post("/v1/audio/speech", json={"input": "Hi.", "voice": "leah"})
    assert r.status_code == 200, r.text
    audio, rate = soundfile.read(io.BytesIO(r.content), dtype="int16")
    assert rate == 24000
    assert_same_pcm(audio, reference("Hi.", "leah"))
    # another voice is another prompt: other tokens, other audio
    other = client.post("/v1/audio/speech", json={"input": "Hi.", "voice": "zac",
                                                  "response_format": "pcm"})
    assert np.frombuffer(other.content, "<i2").tobytes() != audio.tobytes()


def test_streamed_pcm_and_openai_alias(client, reference):
    """A streamed response, and an OpenAI voice name (an alias of the default, tara)."""
    with client.stream("POST", "/v1/audio/speech", json={"input": "Hi.", "voice": "alloy",
                                                         "stream": True,
                                                         "response_format": "pcm"}) as r:
        assert r.status_code == 200
        chunks = [c for c in r.iter_bytes() if c]
    assert_same_pcm(np.frombuffer(b"".join(chunks), "<i2"), reference("Hi.", "tara"))


def test_websocket_session_with_a_voice(live, reference):
    async def session() -> tuple[bytes, dict]:
        async with websockets.connect(live.ws_url, max_size=None) as ws:
            await ws.send(json.dumps({"type": "session.config", "voice": "dan"}))
            for piece in ("Hi", "."):
                await ws.send(json.dumps({"type": "input.text", "text": piece}))
            await ws.send(json.dumps({"type": "input.done"}))
            pcm, done = b"", None
            while done is None:
                msg = await ws.recv()
                if isinstance(msg, bytes):
                    pcm += msg
                elif json.loads(msg)["type"] == "session.done":
                    done = json.loads(msg)
            return pcm, done
    pcm, done = asyncio.run(session())
    assert done["status"] == "completed"
    assert done["stats"]["truncated"] == 1  # capped: the random model never ended its speech
    assert_same_pcm(np.frombuffer(pcm, "<i2"), reference("Hi.", "dan"))


def test_voices_models_and_bad_voice(client):
    voices = client.get("/v1/audio/voices").json()["voices"]
    assert [v["id"] for v in voices] == ["tara", "leah", "jess", "leo", "dan", "mia", "zac", "zoe"]
    assert all(v["sample_rate"] == 24000 for v in voices)
    assert [v["id"] for v in voices if v["default"]] == ["tara"]
    assert "alloy" in voices[0]["aliases"]
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tts-1"]
    # the checkpoint's own name is an alias of the one model: the voice is what is refused
    r = client.post("/v1/audio/speech", json={"input": "Hi.", "model": "orpheus-tiny-ft",
                                              "voice": "nobody"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "voice" and "tara, leah, jess, leo, dan, mia, zac, zoe" in error["message"]
    r = client.post("/v1/audio/speech", json={"input": "Hi.", "decoding": "heads"})
    assert r.status_code == 400 and "draft heads" in r.json()["error"]["message"]
    assert client.get("/health").json() == {"status": "ok"}
    metrics = client.get("/metrics").text
    assert "spectts_audio_seconds_total" in metrics


def test_synth_cli_writes_24khz_and_lists_tokens(orpheus_dirs, tmp_path, capsys):
    ckpt, codec, _ = orpheus_dirs
    out = tmp_path / "out.wav"
    rc = spectts(["synth", "--bundle", str(ckpt), "--codec", str(codec), "--voice", "jess",
                  "--temperature", "0", "--threads", "1", "Hi.", "-o", str(out), "--json"])
    assert rc == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    audio, rate = soundfile.read(out, dtype="float32")
    assert rate == 24000 and len(audio) == 2048 * len(line["tokens"]) // 7
    assert all(128266 <= t < 156938 for t in line["tokens"])
    assert line["stats"]["truncated"] == 1
    rc = spectts(["synth", "--bundle", str(ckpt), "--codec", str(codec), "--voice", "nobody",
                  "Hi.", "-o", str(out)])
    assert rc == 2 and "tara, leah" in capsys.readouterr().err


def test_serve_refuses_a_broken_checkpoint_with_one_line(orpheus_dirs, tmp_path):
    ckpt, _, _ = orpheus_dirs
    empty = tmp_path / "codec"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--bundle", str(ckpt),
                           "--codec", str(empty), "--port", "0"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "lacks config.json" in proc.stderr
