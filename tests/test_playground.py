"""The browser playground at `/`, in a real headless Chromium (Debian's chromium + chromedriver, driven
by selenium) against a live server with the shipped default voice, the API key on and the server
behind a prefix-stripping proxy: the page fills its pickers from the API, speaks over the WebSocket
and plays while audio arrives (bytes and duration counted, AudioContext time advancing, live numbers
equal to the server's session.done), Stop stops, Download WAV saves the same audio, and errors show
as the API words them (no key, empty text, server busy with its retry time).

Without chromium the browser tests are skipped; the protocol tests (the key as a WebSocket
subprotocol, blank input refused, the page's files open and relative) always run."""

from __future__ import annotations

import base64
import contextlib
import json
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
import soundfile
from test_server import LiveServer

from server.app import create_app
from server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "/tts"
KEY = "pl4y+ground/key="  # '+', '/' and '=' are not allowed in a subprotocol: the page encodes it
TEXT = "Hello from the playground. It plays while the audio arrives."
LONG = " ".join(f"Sentence {n} keeps the voice busy for a little while." for n in range(12))
STATIC = ROOT / "server" / "playground"


def behind_prefix(app, prefix: str):
    """A reverse proxy that serves the app under `prefix` and strips it (nginx's
    `location /tts/ { proxy_pass http://server/; }`): other paths never reach the app, so a page
    that used absolute URLs would break here."""

    async def proxy(scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            path = scope["path"]
            if not path.startswith(prefix + "/"):
                if scope["type"] == "http":
                    await send({"type": "http.response.start", "status": 404,
                                "headers": [(b"content-type", b"text/plain")]})
                    await send({"type": "http.response.body", "body": b"not under the prefix"})
                else:
                    await send({"type": "websocket.close", "code": 1008})
                return
            scope = {**scope, "path": path[len(prefix):],
                     "raw_path": scope.get("raw_path", path.encode())[len(prefix):]}
        await app(scope, receive, send)
    return proxy


@pytest.fixture(scope="module")
def server():
    settings = Settings(bundle=ROOT / "models" / "default_voice", device="cpu", threads=1,
                        decoding="heads", api_key=KEY,
                        # one session at a time and one waiting: two held sessions make it busy;
                        # admission control off: this busy test machine may run slower than real time
                        max_batch=1, queue_size=1, admission_control=False)
    app = create_app(settings)
    with LiveServer(behind_prefix(app, PREFIX)) as live:
        live.app, live.settings = app, settings
        live.base = live.url + PREFIX
        live.ws_url = live.base.replace("http", "ws", 1) + "/v1/audio/speech/stream"
        deadline = time.monotonic() + 120
        while httpx.get(live.base + "/ready").status_code != 200:
            assert time.monotonic() < deadline, "the default voice did not load"
            time.sleep(0.1)
        yield live


@pytest.fixture(scope="module")
def api(server):
    with httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as client:
        yield client


def key_protocol(key: str) -> str:
    return "spectts.bearer." + base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def api_message(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    return response.json()["error"]["message"]


# --- the server side: files, the key on a WebSocket, blank input --------------------------------

def test_page_and_files_open_without_key_and_use_relative_urls(server):
    page = httpx.get(server.base + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    links = re.findall(r'(?:href|src)="([^"]+)"', page.text)
    files = [link for link in links if not link.startswith("data:")]
    assert files, "the page links its stylesheet and module"
    for link in files:
        assert not link.startswith(("/", "http:", "https:")), f"{link} is not relative"
        assert httpx.get(f"{server.base}/{link}").status_code == 200, link
    for module in STATIC.glob("*.js"):
        source = module.read_text()
        assert httpx.get(f"{server.base}/playground/{module.name}").text == source
        assert not re.search(r"https?://|[\"'`]/(v1|ready|playground)", source), module.name
        for imported in re.findall(r'from "([^"]+)"', source):
            assert imported.startswith("./") and (STATIC / imported[2:]).is_file(), imported
    # the API itself still needs the key, and nothing answers outside the prefix
    assert httpx.get(server.base + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/").status_code == 404


def test_installed_package_ships_every_page_file():
    """`pip install .` (the Docker image) installs only what package-data names."""
    import fnmatch
    import tomllib

    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["server"]
    for file in STATIC.iterdir():
        name = f"playground/{file.name}"
        assert any(fnmatch.fnmatch(name, g) for g in globs), f"{name} is not in package-data"


def test_websocket_takes_the_key_as_a_subprotocol(server):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    with connect(server.ws_url, subprotocols=["spectts", key_protocol(KEY)]) as ws:
        assert ws.subprotocol == "spectts"  # the key is never echoed
        ws.send(json.dumps({"type": "session.config"}))
        ws.send(json.dumps({"type": "input.text", "text": "Hi."}))
        ws.send(json.dumps({"type": "input.done"}))
        audio, message = b"", {}
        while message.get("type") != "session.done":
            frame = ws.recv(timeout=60)
            if isinstance(frame, bytes):
                audio += frame
            else:
                message = json.loads(frame)
        assert message["status"] == "completed" and audio
    for offers in (["spectts", key_protocol("wrong")], ["spectts", "spectts.bearer.%%%"], ["spectts"]):
        with connect(server.ws_url, subprotocols=offers) as ws:
            assert json.loads(ws.recv(timeout=10))["error"]["code"] == "invalid_api_key"
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=10)
            assert closed.value.rcvd.code == 1008


def test_websocket_refuses_blank_input_as_http_does(server, api):
    from websockets.sync.client import connect

    http = api.post("/v1/audio/speech", json={"input": " \n"})
    with connect(server.ws_url, additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
        ws.send(json.dumps({"type": "session.config"}))
        ws.send(json.dumps({"type": "input.text", "text": " "}))
        ws.send(json.dumps({"type": "input.text", "text": "\n"}))
        ws.send(json.dumps({"type": "input.done"}))
        messages = [json.loads(ws.recv(timeout=30)) for _ in range(2)]
        error = next(m for m in messages if m["type"] == "error")["error"]
        assert error["message"] == api_message(http, 400) and error["code"] == "invalid_input"
        assert next(m for m in messages if m["type"] == "session.done")["status"] == "cancelled"


# --- the page in Chromium -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, driver_exe = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_exe):
        pytest.skip("Debian's chromium and chromium-driver are not installed "
                    "(`bash run.sh test` installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--autoplay-policy=no-user-gesture-required", "--window-size=1200,1000",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_exe))
    driver.downloads = tmp_path_factory.mktemp("downloads")
    driver.execute_cdp_cmd("Browser.setDownloadBehavior",
                           {"behavior": "allow", "downloadPath": str(driver.downloads)})
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """The playground as a user sees it: its controls, and the numbers its elements show (each
    carries its raw value in data-value)."""

    def __init__(self, driver, url: str) -> None:
        self.driver, self.url = driver, url

    def load(self, fresh: bool = False) -> None:
        """Open the page (fresh: with this tab's sessionStorage emptied first)."""
        if fresh and self.driver.current_url.startswith(self.url):
            self.driver.execute_script("sessionStorage.clear()")
        self.driver.get(self.url)
        self.wait(lambda: self.driver.find_element("tag name", "body").get_attribute("data-ready"),
                  "the page's module did not run")

    def enter_key(self, key: str) -> None:
        field = self.el("api-key")
        field.clear()
        field.send_keys(key + "\t")  # the change event

    def el(self, id_: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.ID, id_)

    def value(self, id_: str) -> str:
        return self.el(id_).get_attribute("data-value")

    def number(self, id_: str) -> float:
        return float(self.value(id_) or "nan")

    def state(self) -> str:
        return self.el("status").get_attribute("data-state")

    def error(self) -> str | None:
        error = self.el("error")
        return error.text if error.is_displayed() else None

    def final(self) -> dict[str, float]:
        return {dd.get_attribute("data-key"): float(dd.get_attribute("data-value"))
                for dd in self.driver.find_elements("css selector", "#final dd[data-key]")}

    def options(self, id_: str) -> list[str]:
        return [o.get_attribute("value") for o in self.el(id_).find_elements("tag name", "option")]

    def type_text(self, text: str) -> None:
        box = self.el("text")
        box.clear()
        if text:
            box.send_keys(text)

    def screenshot(self, path: Path) -> None:
        """The whole page, however tall."""
        height = self.driver.execute_script(
            "return Math.ceil(document.body.getBoundingClientRect().bottom)")
        metrics = {"width": 1200, "height": height, "deviceScaleFactor": 1, "mobile": False}
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
        self.driver.save_screenshot(str(path))
        self.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})

    def wait(self, condition, what: str, timeout: float = 30):
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(
            lambda _: condition(), message=what)


@pytest.fixture(scope="module")
def tab(browser, server):
    """The page in the browser's one tab, before the key is entered."""
    return Page(browser, server.base + "/")


@pytest.fixture
def page(tab, api):
    """The page with the API key entered and its pickers filled."""
    if not tab.driver.current_url.startswith(tab.url):
        tab.load()
    if tab.driver.execute_script("return sessionStorage.getItem('spectts.apiKey')") != KEY:
        tab.enter_key(KEY)
    models = [m["id"] for m in api.get("/v1/models").json()["data"]]
    tab.wait(lambda: tab.options("model") == models, "the model picker is not the API's list")
    return tab


def test_page_asks_for_the_key_then_fills_its_pickers(tab, server, api):
    tab.load(fresh=True)
    unauthorized = api_message(httpx.get(server.base + "/v1/models"), 401)
    tab.wait(lambda: tab.error() == unauthorized, "the API's 401 message is not shown")
    assert tab.el("error").get_attribute("data-code") == "invalid_api_key"

    tab.enter_key(KEY)  # kept in sessionStorage, the lists reloaded
    models = [m["id"] for m in api.get("/v1/models").json()["data"]]
    tab.wait(lambda: tab.options("model") == models, "the model picker is not the API's list")
    assert not tab.el("model-picker").is_displayed()  # one model: nothing to pick
    voice = api.get("/v1/audio/voices").json()["voices"][0]
    assert tab.options("voice") == [voice["id"], *voice["aliases"]]
    assert tab.error() is None
    storage = tab.driver.execute_script(
        "return [sessionStorage.getItem('spectts.apiKey'), localStorage.length]")
    assert storage == [KEY, 0]
    default = api.get("/ready").json()["default"]["decoding"]
    tab.wait(lambda: default in tab.el("decoding").text, "the server's default decoding")


def test_speak_streams_plays_and_counts(page, server, api, tmp_path):
    reference = api.post("/v1/audio/speech", json={"input": TEXT, "response_format": "pcm"})
    assert reference.status_code == 200 and reference.content
    rate = api.get("/v1/audio/voices").json()["voices"][0]["sample_rate"]

    page.type_text(TEXT)
    page.el("speak").click()
    page.wait(lambda: page.number("bytes") > 0, "no audio arrived")
    page.wait(lambda: page.el("level").value_of_css_property("width") not in ("0px", ""),
              "the level meter did not move while playing")
    page.wait(lambda: page.state() == "completed", "the session did not complete", timeout=60)

    # what arrived: the same PCM as the HTTP API gives, counted by the page
    assert page.number("bytes") == len(reference.content)
    duration = len(reference.content) / 2 / rate
    assert page.number("audio") == pytest.approx(duration)
    assert page.value("sentences") == "2"
    # live numbers, and the server's session.done stats next to them
    final = page.final()
    assert page.value("final-status") == "completed"
    assert 0 < page.number("ttfa") < 30 and page.number("rtf") > 0
    assert page.number("tpf") == pytest.approx(final["mean_accepted_length"]) and final["tokens"] > 0
    assert final["drafted"] > 0  # heads decoding drafts
    assert page.number("acceptance") == pytest.approx(final["accepted"] / final["drafted"])
    assert final["audio_seconds"] == pytest.approx(duration, abs=1e-3)
    assert final["time_to_first_audio_seconds"] > 0 and final["real_time_factor"] > 0
    # played by the AudioContext to the end: its clock ran through the whole audio
    page.wait(lambda: page.number("played") >= duration - 1e-3, "playback did not reach the end",
              timeout=duration + 10)
    assert float(page.el("played").get_attribute("data-context-time")) >= duration
    inked = page.driver.execute_script("""
        const c = document.getElementById('wave'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let x = 0; x < c.width; x++) for (let y = 0; y < c.height; y++)
            if (y !== c.height / 2 && d[(y * c.width + x) * 4 + 3] > 0) { n++; break; }
        return n;""")
    assert inked > 100, "the waveform was not drawn"
    page.screenshot(tmp_path / "playground.png")

    page.el("download").click()  # Download WAV: POST v1/audio/speech, the same audio
    wav = page.driver.downloads / "spectts.wav"
    page.wait(lambda: wav.exists() and wav.stat().st_size > 44, "no WAV was downloaded")
    audio, wav_rate = soundfile.read(wav, dtype="int16")
    assert wav_rate == rate and len(audio) * 2 == len(reference.content)

    severe = [e["message"] for e in page.driver.get_log("browser") if e["level"] == "SEVERE"
              and "status of 401" not in e["message"]]  # the first load, before the key
    assert not severe, severe


def test_stop_stops(page, server):
    page.type_text(LONG)
    page.el("speak").click()
    # the numbers fill in while it speaks: after the first sentence, with eleven still to come
    page.wait(lambda: page.number("sentences") >= 1, "no sentence was finished", timeout=60)
    assert page.state() == "speaking"
    assert page.number("bytes") > 0 and page.number("played") >= 0
    assert page.number("tpf") >= 1 and page.number("rtf") > 0 and page.number("ttfa") > 0
    played = page.number("played")
    page.el("stop").click()
    page.wait(lambda: page.state() == "cancelled", "the session was not cancelled")
    assert page.value("final-status") == "cancelled"
    counts = [page.number(n) for n in ("bytes", "audio", "played")]
    # the playhead stopped where it was: audio buffered ahead of it was dropped, not counted
    assert played <= counts[2] < played + 0.5
    time.sleep(1.0)
    assert [page.number(n) for n in ("bytes", "audio", "played")] == counts  # nothing more came or played
    assert page.number("buffered") == 0
    service = server.app.state.spectts.service
    page.wait(lambda: service.active == 0 and service.waiting == 0,
              "the server kept the session after Stop", timeout=10)
    assert page.driver.execute_script("return document.getElementById('speak').disabled") is False


def test_empty_text_shows_the_api_error(page, api):
    message = api_message(api.post("/v1/audio/speech", json={"input": ""}), 400)
    page.type_text("")
    page.el("speak").click()
    page.wait(lambda: page.error() == message, "the API's empty-input message is not shown")
    assert page.state() == "error"
    page.el("download").click()  # the HTTP API says the same
    page.wait(lambda: page.error() == message, "the download's 400 message is not shown")


def test_busy_server_shows_the_retry_time(page, server):
    from websockets.sync.client import connect

    service = server.app.state.spectts.service
    auth = {"Authorization": f"Bearer {KEY}"}

    def open_session(ws) -> None:  # an unfinished sentence: the session stays open
        ws.send(json.dumps({"type": "session.config"}))
        ws.send(json.dumps({"type": "input.text", "text": "Still typing"}))

    with contextlib.ExitStack() as stack:
        for _ in range(2):  # one runs, one waits: the server is full
            open_session(stack.enter_context(connect(server.ws_url, additional_headers=auth)))
        page.wait(lambda: service.active == 1 and service.waiting == 1,
                  "the two sessions did not fill the server")
        with connect(server.ws_url, additional_headers=auth) as ws:
            open_session(ws)
            refused = json.loads(ws.recv(timeout=10))
        assert refused["error"]["code"] == "server_busy", refused
        page.type_text(TEXT)
        page.el("speak").click()
        page.wait(lambda: page.error() is not None, "no error shown")
        assert page.el("error").get_attribute("data-code") == "server_busy"
        assert page.error() == f"{refused['error']['message']} (Retry-After: {refused['retry_after']} s)"
        assert refused["retry_after"] == server.settings.retry_after_s
    page.wait(lambda: service.active == 0 and service.waiting == 0,
              "the held sessions were not released", timeout=10)
