"""What HTTP and WebSocket requests share: the server's state, turning request options into a
GenerationConfig, starting a stream off the event loop, and stopping it on timeout or disconnect."""

from __future__ import annotations

import asyncio
import logging
import threading
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
from server.model_registry import ModelRegistry, ModelSpec, UnknownModel
from server.schemas import OPENAI_VOICES, SpeechOptions
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
class ServedModel:
    """A model being served: its name and bundle, its service (own engine thread) and its default
    decoding (each voice measures its own "auto")."""

    spec: ModelSpec
    service: TTSService
    default_cfg: GenerationConfig
    owned: bool  # started by the app (stopped at shutdown), not injected

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def tts(self) -> TextToSpeech:
        return self.service.tts

    def voice_ids(self) -> list[str]:
        """The voice's speakers, then OpenAI's names (aliases of the default speaker)."""
        return list(dict.fromkeys([*self.tts.voices, *OPENAI_VOICES]))

    def speaker(self, voice: str | None) -> str | None:
        """A request's voice -> the speaker to use (None: the default); APIError 400 listing the
        speakers for an unknown one."""
        if voice is None or voice in OPENAI_VOICES:
            return None
        if voice not in self.tts.voices:
            raise errors.bad_request(f"unknown voice {voice!r}; model {self.name!r} speaks with "
                                     f"{', '.join(self.tts.voices)} (OpenAI's voice names are "
                                     f"aliases of {self.tts.default_voice!r})", "unknown_voice",
                                     "voice")
        return voice

    def describe(self) -> dict:
        """This model as /ready reports it."""
        return {"name": self.name, "voice": self.tts.name, "bundle": str(self.spec.bundle),
                "sample_rate": self.tts.sample_rate, "runner": self.tts.engine.runner,
                "default": describe(self.default_cfg, self.tts)}


@dataclass(frozen=True)
class Resolved:
    """A request's options resolved: the model that speaks it, its GenerationConfig, speed and
    speaker (None: the voice's default)."""

    model: ServedModel
    cfg: GenerationConfig
    speed: float
    voice: str | None


@dataclass
class ServerState:
    """One app's state (app.state.spectts): settings, the models it serves (`registry`, from the
    settings) and, once loaded, each model's service; metrics."""

    settings: Settings
    models: dict[str, ServedModel] = field(default_factory=dict)  # loaded so far, by name
    load_error: BaseException | None = None
    formats: tuple[str, ...] = field(default_factory=supported_formats)
    registry: ModelRegistry = field(init=False)
    metrics: Metrics = field(init=False)
    closed: bool = field(default=False, init=False)  # shut down: a late-loaded service is stopped
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self.registry = self.settings.registry()
        self.metrics = Metrics(self.services)

    def attach(self, name: str, service: TTSService, owned: bool,
               cfg: GenerationConfig | None = None) -> bool:
        """Serve `service` as model `name` (a registry name). cfg: its default decoding when
        already resolved (else `default_config`). False, attaching nothing, once the app has shut
        down (the caller stops a service it started)."""
        cfg = cfg or default_config(self.settings, service.tts)
        spec = self.registry.resolve(name)
        with self._lock:
            if self.closed:
                return False
            self.models[spec.name] = ServedModel(spec, service, cfg, owned)
        self.metrics.add_model(spec.name)
        return True

    def close(self) -> list[ServedModel]:
        """Shut down: no model attaches after this. Returns the models the app started (to stop)."""
        with self._lock:
            self.closed = True
            return [m for m in self.models.values() if m.owned]

    @property
    def ready(self) -> bool:
        """Every model is loaded and warmed up."""
        return all(name in self.models for name in self.registry.names)

    @property
    def service(self) -> TTSService | None:
        """The default model's service (None before it has loaded)."""
        default = self.models.get(self.registry.default.name)
        return default.service if default else None

    def services(self) -> dict[str, TTSService]:
        """The loaded models' services by name (a copy: models attach from the loading thread)."""
        with self._lock:
            return {name: m.service for name, m in self.models.items()}

    def loaded(self) -> list[ServedModel]:
        """The loaded models, in the registry's order (the default first)."""
        return [self.models[n] for n in self.registry.names if n in self.models]

    # --- requests ------------------------------------------------------------------------------
    def model(self, name: str | None) -> ServedModel:
        """The model a request names (None: the default): APIError 400 `unknown_model` listing the
        served ones, 503 while it is loading."""
        try:
            spec = self.registry.resolve(name)
        except UnknownModel as exc:
            raise errors.bad_request(str(exc), "unknown_model", "model") from None
        served = self.models.get(spec.name)
        if served is None:
            raise errors.not_ready()
        return served

    def resolve(self, opts: SpeechOptions) -> Resolved:
        """The request's model, GenerationConfig (that model's defaults, then the request's
        fields), speed and speaker; APIError 400 for unknown names. The engine checks the config
        once, when the request opens (`TTSService.open`: ConfigError -> 400 naming the field)."""
        model = self.model(opts.model)
        voice = model.speaker(opts.voice)
        cfg = model.default_cfg
        sampling = {k: getattr(opts, k) for k in ("temperature", "top_k", "top_p",
                                                   "repetition_penalty")
                    if getattr(opts, k) is not None}
        decoding = {k: getattr(opts, k) for k in ("decoding", "accept", "tau", "beta", "min_ratio",
                                                   "gamma", "seed")
                    if getattr(opts, k) is not None}
        return Resolved(model, replace(cfg, sampling=replace(cfg.sampling, **sampling), **decoding),
                        opts.speed, voice)

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


async def start_speech(state: ServerState, text: str, request: Resolved) -> SpeechStream:
    """The request's model speaks `text`: service.speak in a worker thread (phonemising takes
    milliseconds: never on the event loop). APIError 400 for unspeakable text, 503 when the queue
    is full."""
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.to_thread(request.model.service.speak, text, request.cfg,
                                       request.speed, loop, request.voice)
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
