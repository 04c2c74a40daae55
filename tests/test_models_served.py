"""One server, two named models (`--models tts-1=A,tts-1-hd=B`): two random tiny voices with
different weights, each with its own engine thread. A request's `model` (HTTP, WebSocket
session.config) picks the voice that speaks, and each model's audio equals what that voice gives
offline; an unknown name is a 400 listing the served ones; /v1/models, /ready, /v1/audio/voices and
the metrics know each model; `spectts synth --model` resolves the same names; both engine threads
stop at shutdown, also when the app shuts down while still loading."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import soundfile
from test_server import LiveServer, assert_error, assert_same_audio, scrape, ws_session
# the server bar's live server and its client, here over this module's `settings` (two models);
# the playground's headless browser
from test_playground import browser  # noqa: F401
from test_server import client, live  # noqa: F401

from engine.tts import TextToSpeech
from models.recipes.random_voice import build_random_voice
from server.app import create_app
from server.audio import pcm16
from server.cli import main
from server.model_registry import ModelRegistry, UnknownModel
from server.settings import Settings
from server.speech import default_config

TEXT = "Two voices, one server. Each speaks for itself."
NAMES = ["tts-1", "tts-1-hd"]


@pytest.fixture(scope="module")
def bundles(tiny_voice, tmp_path_factory):
    """model name -> a random voice bundle; the second has other weights (another seed)."""
    return {"tts-1": tiny_voice,
            "tts-1-hd": build_random_voice(tmp_path_factory.mktemp("hd"), seed=11)}


def pairs(bundles) -> str:
    return ",".join(f"{name}={path}" for name, path in bundles.items())


@pytest.fixture(scope="module")
def settings(bundles):
    # as tests/test_server.py: behaviour, not capacity (admission control off); no phoneme
    # constraint (near-ties of random weights); plain decoding: no autotuning at start
    return Settings(models=pairs(bundles), device="cpu", threads=1, decoding="plain", max_batch=2,
                    queue_size=8, admission_control=False, phoneme_coverage=1.0)


@pytest.fixture(scope="module")
def offline(bundles, settings):
    """model name -> text -> PCM16 samples of that voice's offline synthesis (the server's decoding
    defaults)."""
    voices = {name: TextToSpeech(path, max_batch=2, phoneme_coverage=settings.phoneme_coverage)
              for name, path in bundles.items()}
    cache: dict[tuple[str, str], np.ndarray] = {}

    def pcm(model: str, text: str = TEXT) -> np.ndarray:
        if (model, text) not in cache:
            tts = voices[model]
            audio = tts.synthesize(text, default_config(settings, tts)).audio
            cache[model, text] = np.frombuffer(pcm16(audio), "<i2")
        return cache[model, text]
    return pcm


def speak(client, model: str | None, text: str = TEXT) -> np.ndarray:
    body = {"input": text, "response_format": "pcm", **({"model": model} if model else {})}
    response = client.post("/v1/audio/speech", json=body)
    assert response.status_code == 200, response.text
    return np.frombuffer(response.content, "<i2")


# --- the names ------------------------------------------------------------------------------------

def test_registry_names_the_models_as_settings_give_them(tiny_voice, tmp_path):
    both = ModelRegistry.parse(f" b = {tmp_path} , a={tiny_voice}")
    assert both.names == ["b", "a"] and both.default.name == "b"  # the first is the default
    assert both.resolve(None).name == both.resolve("spectts").name == "b"
    assert both.resolve("a").bundle == tiny_voice
    with pytest.raises(UnknownModel, match="the models served are b, a"):
        both.resolve("tiny")  # a bundle's own name names a model only when served alone
    single = Settings(bundle=tiny_voice).registry()
    assert single.names == ["tts-1"]
    assert single.resolve("tiny") == single.resolve("spectts") == single.resolve("tts-1")
    with pytest.raises(UnknownModel, match="tts-1"):
        single.resolve("tts-1-hd")
    for bad in ("tts-1", "a=", "=x", f"a={tmp_path},a={tmp_path}", f"spectts={tmp_path}",
                f"a b={tmp_path}"):
        with pytest.raises(ValueError):
            Settings(models=bad)
    with pytest.raises(ValueError, match="codec"):
        Settings(models=f"a={tmp_path}", codec=tmp_path)


def test_serve_flag_and_environment(monkeypatch, tmp_path):
    import argparse

    from server.serve import add_serve_parser, settings_from_args

    parser = argparse.ArgumentParser(prog="spectts")
    add_serve_parser(parser.add_subparsers(dest="command"))
    monkeypatch.setenv("SPECTTS_MODELS", f"x={tmp_path}")
    assert settings_from_args(parser.parse_args(["serve"])).registry().names == ["x"]
    got = settings_from_args(parser.parse_args(["serve", "--models", f"y={tmp_path},z={tmp_path}"]))
    assert got.registry().names == ["y", "z"]


# --- HTTP ---------------------------------------------------------------------------------------

def test_each_model_speaks_with_its_own_voice(client, offline):
    served = {name: speak(client, name) for name in NAMES}
    for name in NAMES:
        assert_same_audio(served[name], offline(name))
    a, b = offline("tts-1"), offline("tts-1-hd")
    # far beyond the streaming vocoder's rounding (assert_same_audio: 4 LSB): another voice
    assert len(a) != len(b) or np.abs(a.astype(np.int32) - b).max() > 100, "the voices are alike"
    # no model, and spectts: the default model, the first listed
    assert_same_audio(speak(client, None), offline("tts-1"))
    assert_same_audio(speak(client, "spectts"), offline("tts-1"))


def test_both_models_at_once(live, offline):
    """Requests for both models at the same time: each engine thread speaks its own."""
    texts = [("tts-1", TEXT), ("tts-1-hd", TEXT), ("tts-1-hd", "A second line."),
             ("tts-1", "A second line.")]
    def one(job: tuple[str, str]) -> np.ndarray:
        with httpx.Client(base_url=live.url, timeout=60) as own:
            return speak(own, *job)

    with ThreadPoolExecutor(len(texts)) as pool:
        got = list(pool.map(one, texts))
    for (model, text), pcm in zip(texts, got):
        assert_same_audio(pcm, offline(model, text))


def test_unknown_model_is_a_400_listing_the_served_ones(client):
    for model in ("gpt-9", "tiny", "tts-2"):
        error = assert_error(client.post("/v1/audio/speech", json={"input": "Hi.", "model": model}),
                             400, "model")
        assert error["code"] == "unknown_model" and repr(model) in error["message"]
        assert "tts-1, tts-1-hd" in error["message"]
    error = assert_error(client.get("/v1/audio/voices", params={"model": "nope"}), 400, "model")
    assert error["code"] == "unknown_model"
    assert client.get("/health").json() == {"status": "ok"}


def test_models_ready_and_voices(client, bundles):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == NAMES
    assert all(m["object"] == "model" and m["owned_by"] == "spectts" for m in models["data"])
    ready = client.get("/ready").json()
    assert ready["status"] == "ready" and ready["model"] == "tts-1"
    assert [m["name"] for m in ready["models"]] == NAMES
    for entry in ready["models"]:
        assert entry["bundle"] == str(bundles[entry["name"]]) and entry["voice"] == "tiny"
        assert entry["default"] == {"decoding": "plain", "accept": "exact"}
        assert entry["sample_rate"] == 22050 and entry["runner"]
    assert ready["default"] == ready["models"][0]["default"]
    for name in NAMES:
        voices = client.get("/v1/audio/voices", params={"model": name}).json()
        assert voices["model"] == name and voices["voices"][0]["id"] == "tiny"
    assert client.get("/v1/audio/voices").json()["model"] == "tts-1"


def test_metrics_carry_the_model(client):
    from prometheus_client.parser import text_string_to_metric_families

    def by_model() -> dict[tuple[str, str, str], float]:
        out = {}
        for family in text_string_to_metric_families(client.get("/metrics").text):
            for s in family.samples:
                if s.name in ("spectts_generated_tokens_total", "spectts_audio_seconds_total",
                              "spectts_kv_cache_slots") or (
                        s.name == "spectts_requests_total"
                        and s.labels["route"] == "/v1/audio/speech"):
                    out[s.name, s.labels["model"], s.labels.get("status", "")] = s.value
        return out

    before = by_model()
    speak(client, "tts-1-hd")
    client.post("/v1/audio/speech", json={"input": "Hi.", "model": "nope"})
    after = by_model()

    def moved(name: str, model: str, status: str = "") -> float:
        return after.get((name, model, status), 0) - before.get((name, model, status), 0)

    assert moved("spectts_requests_total", "tts-1-hd", "200") == 1
    assert moved("spectts_requests_total", "", "400") == 1  # refused before a model was chosen
    assert moved("spectts_generated_tokens_total", "tts-1-hd") > 0
    assert moved("spectts_audio_seconds_total", "tts-1-hd") > 0
    assert moved("spectts_generated_tokens_total", "tts-1") == 0
    assert ("spectts_generated_tokens_total", "tts-1", "") in after  # started at 0 when loaded
    assert after["spectts_kv_cache_slots", "tts-1", ""] == after["spectts_kv_cache_slots",
                                                                   "tts-1-hd", ""] == 2
    # tests/test_server.py's scrape sums over models
    summed = scrape(client)
    assert summed[("spectts_kv_cache_slots", ())] == 4


# --- WebSocket ----------------------------------------------------------------------------------

def test_websocket_session_config_picks_the_model(live, offline):
    from websockets.sync.client import connect

    with connect(live.ws_url) as ws:
        for model in ("tts-1-hd", "tts-1", "tts-1-hd"):  # each session.config switches
            ws.send(json.dumps({"type": "session.config", "model": model}))
            messages, audio = ws_session(ws, [TEXT])
            assert messages[-1]["status"] == "completed"
            pcm = np.frombuffer(b"".join(audio[i] for i in sorted(audio)), "<i2")
            assert_same_audio(pcm, offline(model))
        ws.send(json.dumps({"type": "session.config", "model": "tts-9"}))
        reply = json.loads(ws.recv(timeout=10))
        assert reply["type"] == "error" and reply["error"]["code"] == "unknown_model"
        assert "tts-1, tts-1-hd" in reply["error"]["message"]


# --- the command line ---------------------------------------------------------------------------

def test_synth_model_picks_by_the_servers_names(bundles, tmp_path, capsys):
    hd = TextToSpeech(bundles["tts-1-hd"])
    from server.cli import build_parser, generation_config

    out = tmp_path / "hd.wav"
    argv = ["synth", TEXT, "--models", pairs(bundles), "--model", "tts-1-hd", "-o", str(out)]
    assert main(argv) == 0
    cfg = generation_config(build_parser().parse_args(argv), hd.sampling_defaults)
    expected = np.frombuffer(pcm16(hd.synthesize(TEXT, cfg).audio), "<i2")
    got, rate = soundfile.read(out, dtype="int16")
    assert rate == 22050
    assert_same_audio(got, expected)

    for argv, known in ((["--models", pairs(bundles), "--model", "tts-1-large"], "tts-1, tts-1-hd"),
                        (["--bundle", str(bundles["tts-1"]), "--model", "tts-1-hd"], "tts-1")):
        capsys.readouterr()
        assert main(["synth", "Hi.", *argv, "-o", str(tmp_path / "x.wav")]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "unknown model" in err and known in err
    # the single bundle answers to tts-1, spectts and its own name, as the server does
    assert main(["synth", "Hi.", "--bundle", str(bundles["tts-1"]), "--model", "tiny", "-o",
                 str(tmp_path / "tiny.wav")]) == 0


# --- threads ------------------------------------------------------------------------------------

def spectts_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("spectts-") and t.is_alive()}


def test_both_engine_threads_stop_at_shutdown(settings):
    before = spectts_threads()
    server = LiveServer(create_app(settings))
    with server:
        server.wait_ready()
        state = server.server.config.app.state.spectts
        services = state.services()
        assert list(services) == NAMES and services["tts-1"] is not services["tts-1-hd"]
        started = spectts_threads() - before
        assert len(started) >= 4, started  # each model: an engine and a frontend thread at least
        assert httpx.post(server.url + "/v1/audio/speech", json={"input": "Hi.",
                                                                  "model": "tts-1-hd"}).is_success
    server.thread.join(30)
    assert not server.thread.is_alive()
    assert not (spectts_threads() - before), spectts_threads() - before


def test_shutdown_while_loading_leaves_no_engine_thread(settings):
    """The app stops before its models have loaded: the loading thread stops what it loads."""
    before = spectts_threads()
    server = LiveServer(create_app(settings))
    with server:
        assert httpx.get(server.url + "/ready").status_code == 503
    server.thread.join(60)  # asyncio.run waits for the loading thread
    assert not server.thread.is_alive()
    time.sleep(0.1)
    assert not (spectts_threads() - before), spectts_threads() - before


def test_replicas_serve_every_model(settings):
    """Scale-out: a replica is built from the launcher's settings, `models` included; before a
    replica's capacity is measured, Serve may send it one engine batch per model."""
    pytest.importorskip("ray.serve", reason="the `ray` extra is not installed")
    from server.scale_out import deployment_options, replica_args

    args = replica_args(settings)
    assert args["models"] == settings.models
    assert Settings(**args).registry().names == NAMES
    assert deployment_options(settings, None)["max_ongoing_requests"] == 2 * settings.max_batch


# --- the playground -----------------------------------------------------------------------------

def test_playground_offers_the_models_and_speaks_with_the_chosen_one(live, browser, client):
    """With two models the page shows its model picker (the API's list, default first); the chosen
    model speaks (tests/test_playground.py: one model, no picker)."""
    from selenium.webdriver.support.ui import Select
    from test_playground import Page

    page = Page(browser, live.url + "/")
    page.load()
    page.wait(lambda: page.options("model") == NAMES, "the model picker is not the API's list")
    assert page.el("model-picker").is_displayed()
    assert page.el("model").get_attribute("value") == NAMES[0]  # the default
    Select(page.el("model")).select_by_value("tts-1-hd")
    tokens = ("spectts_generated_tokens_total", (("model", "tts-1-hd"),))

    def hd_tokens() -> float:
        from prometheus_client.parser import text_string_to_metric_families

        return sum(s.value for f in text_string_to_metric_families(client.get("/metrics").text)
                   for s in f.samples if (s.name, tuple(s.labels.items())) == tokens)

    before = hd_tokens()
    page.type_text("Spoken by the larger voice.")
    page.el("speak").click()
    page.wait(lambda: page.state() == "completed", "the session did not complete", timeout=60)
    assert hd_tokens() - before == page.final()["tokens"] > 0
