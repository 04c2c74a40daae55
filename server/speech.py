"""What HTTP and WebSocket requests share: the server's state, turning request options into a
GenerationConfig, starting a stream off the event loop, and stopping it on timeout or disconnect."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace

from fastapi.requests import HTTPConnection
from starlette.requests import Request

from engine.decoding.autotune import auto_config
from engine.serving.service import TTSService
from engine.serving.stream import SpeechStream
from engine.tts import TextToSpeech
from engine.types import ConfigError, GenerationConfig
from server import errors
from server.audio import supported_formats
from server.metrics import Metrics
from server.schemas import MODEL_ALIASES, OPENAI_VOICES, SpeechOptions
from server.settings import Settings

MAX_NEW_TOKENS = 10**6  # per request; TextToSpeech caps every sentence by its phonemes
# the warm-up sentence: seeds admission control's model and measures decoding "auto"
CALIBRATION_TEXT = "The quick brown fox jumps over the lazy dog, and then it rests for a while."
log = logging.getLogger("spectts.server")


def default_config(settings: Settings, tts: TextToSpeech) -> GenerationConfig:
    """The server's decoding defaults. Decoding "auto": the fastest decoding (and heads tree) on this
    machine, measured on CALIBRATION_TEXT (`engine.decoding.autotune`; a few seconds)."""
    auto = settings.decoding == "auto"
    sampling = tts.sampling_defaults  # the voice family's
    if settings.temperature is not None:
        sampling = replace(sampling, temperature=settings.temperature)
    cfg = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS,
                           decoding="plain" if auto else settings.decoding, accept=settings.accept,
                           tau=settings.tau, beta=settings.beta, gamma=settings.gamma,
                           min_ratio=settings.min_ratio, sampling=sampling)
    if auto:
        cfg, measured = auto_config(tts, CALIBRATION_TEXT, cfg)
        log.info("decoding auto: %s (%s)", describe(cfg, tts),
                 ", ".join(f"{m.label} {m.tokens_per_s:.0f}" for m in measured) + " tokens/s")
    return cfg


def describe(cfg: GenerationConfig, tts: TextToSpeech) -> dict:
    """The default decoding as /ready reports it."""
    out = {"decoding": cfg.decoding, "accept": cfg.accept}
    if cfg.decoding == "heads":
        out["tree_nodes"] = len(cfg.tree or tts.engine.default_trees[cfg.accept])
    return out


@dataclass
class ServerState:
    """One app's state (app.state.spectts): settings, metrics and, once loaded, the service."""

    settings: Settings
    service: TTSService | None = None
    default_cfg: GenerationConfig | None = None
    owns_service: bool = False  # started by the app (stopped at shutdown), not injected
    load_error: BaseException | None = None
    formats: tuple[str, ...] = field(default_factory=supported_formats)
    metrics: Metrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = Metrics(lambda: self.service)

    def attach(self, service: TTSService, owned: bool, cfg: GenerationConfig | None = None) -> None:
        """cfg: the default decoding when already resolved (else `default_config`)."""
        self.default_cfg = cfg or default_config(self.settings, service.tts)
        self.service, self.owns_service = service, owned

    def require(self) -> TTSService:
        if self.service is None:
            raise errors.not_ready()
        return self.service

    # --- names ---------------------------------------------------------------------------------
    @property
    def voice(self) -> str:
        return self.service.tts.name if self.service else "default"

    @property
    def model_ids(self) -> list[str]:
        return list(dict.fromkeys([*MODEL_ALIASES, self.voice]))

    def voice_ids(self) -> list[str]:
        """The voice's speakers, then OpenAI's names (aliases of the default speaker)."""
        speakers = list(self.service.tts.voices) if self.service else [self.voice]
        return list(dict.fromkeys([*speakers, *OPENAI_VOICES]))

    def speaker(self, voice: str | None) -> str | None:
        """A request's voice -> the speaker to use (None: the default); APIError 400 listing the
        speakers for an unknown one."""
        if voice is None or voice in OPENAI_VOICES:
            return None
        speakers = self.service.tts.voices
        if voice not in speakers:
            raise errors.bad_request(f"unknown voice {voice!r}; this server speaks with "
                                     f"{', '.join(speakers)} (OpenAI's voice names are aliases of "
                                     f"{self.service.tts.default_voice!r})", "unknown_voice",
                                     "voice")
        return voice

    # --- requests ------------------------------------------------------------------------------
    def resolve(self, opts: SpeechOptions) -> tuple[GenerationConfig, float, str | None]:
        """The request's GenerationConfig, speed and speaker (`speaker`); APIError 400 for unknown
        names. The engine checks the config once, when the request opens (`TTSService.open`:
        ConfigError -> 400 naming the field)."""
        self.require()
        if opts.model is not None and opts.model not in self.model_ids:
            raise errors.bad_request(f"unknown model {opts.model!r}; this server has "
                                     f"{', '.join(self.model_ids)}", "unknown_model", "model")
        voice = self.speaker(opts.voice)
        cfg = self.default_cfg
        sampling = {k: getattr(opts, k) for k in ("temperature", "top_k", "top_p",
                                                   "repetition_penalty")
                    if getattr(opts, k) is not None}
        decoding = {k: getattr(opts, k) for k in ("decoding", "accept", "tau", "beta", "min_ratio",
                                                   "gamma", "seed")
                    if getattr(opts, k) is not None}
        return (replace(cfg, sampling=replace(cfg.sampling, **sampling), **decoding), opts.speed,
                voice)

    def check_input(self, text: str) -> str:
        if not text.strip():
            raise errors.bad_request("input is empty", "invalid_input", "input")
        limit = self.settings.max_input_chars
        if len(text) > limit:
            raise errors.bad_request(f"input has {len(text)} characters; the limit is {limit}",
                                     "input_too_long", "input")
        return text


def get_state(conn: HTTPConnection) -> ServerState:
    """The app's state (a dependency: tests may override it)."""
    return conn.app.state.spectts


async def start_speech(state: ServerState, text: str, cfg: GenerationConfig, speed: float,
                       voice: str | None = None) -> SpeechStream:
    """service.speak in a worker thread (phonemising takes milliseconds: never on the event loop).
    APIError 400 for unspeakable text, 503 when the queue is full."""
    service = state.require()
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.to_thread(service.speak, text, cfg, speed, loop, voice)
    except ConfigError as exc:  # the engine cannot run this config (checked once, here)
        raise errors.to_api_error(exc) from None
    except ValueError as exc:
        raise errors.bad_request(str(exc), "invalid_input", "input") from None
    except Exception as exc:  # ServiceBusy and anything unexpected
        raise errors.to_api_error(exc, state.settings.retry_after_s) from None


class Guard:
    """Stops a stream when it runs past the timeout or (HTTP) the client goes away."""

    def __init__(self, stream: SpeechStream, timeout_s: float, request: Request | None = None
                 ) -> None:
        self.stream, self.timeout_s = stream, timeout_s
        self.timed_out = self.disconnected = False
        self.started = time.perf_counter()
        self._timer = asyncio.get_running_loop().call_later(timeout_s, self._expire)
        self._watch = asyncio.create_task(self._watch_disconnect(request)) if request else None

    def _expire(self) -> None:
        if not self.stream.closed:
            self.timed_out = True
            self.stream.cancel()

    async def _watch_disconnect(self, request: Request) -> None:
        """The body has been read, so the next ASGI message is http.disconnect: the client left
        (or the response is complete, when the stream has ended anyway)."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                if not self.stream.closed:
                    self.disconnected = True
                    self.stream.cancel()
                return

    def close(self) -> None:
        """Stop watching; cancel the stream if it is still running (the response was abandoned)."""
        self._timer.cancel()
        if self._watch is not None:
            self._watch.cancel()
        if not self.stream.closed:
            self.stream.cancel()
