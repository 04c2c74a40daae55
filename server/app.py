"""The FastAPI application: `create_app(settings, service=None)`.

At startup the lifespan loads each served model (`settings.registry()`: one `tts-1` from `bundle`,
or the `models` pairs) in a worker thread, one after the other (the server already answers /health,
and /ready says 503): its voice, a warm-up with one short synthesis, then its own engine thread;
/ready turns 200 once all are running. At shutdown every engine thread the app started is stopped.
Tests may pass a pre-built, started `TTSService` as the default model instead: the app leaves that
service's lifecycle to its owner.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from engine.serving.deadlines import Policy
from engine.serving.service import TTSService
from engine.types import GenerationConfig
from server import errors, routes_http, routes_playground, routes_ws
from server.middleware import OPEN_PATHS, ServerMiddleware
from server.settings import Settings
from server.model_registry import ModelSpec
from server.speech import CALIBRATION_TEXT, ServerState, default_config

log = logging.getLogger("spectts.server")


def load_voice(settings: Settings, spec: ModelSpec | None = None):
    """A model's voice (None: the default model) as the server runs it: device, torch threads,
    cache sizes, runner (blocking). Returns the TextToSpeech (or a family's counterpart)."""
    import sys

    from engine.decoding.engine import resolve_device
    from engine.orpheus_tts import load_tts
    from engine.threads import set_threads

    # the engine thread gives the GIL up in every torch op; with Python's default 5 ms a busy event
    # loop (many WebSocket handshakes) can keep it that long each time
    sys.setswitchinterval(settings.switch_interval_s)
    spec = spec or settings.registry().default
    device = resolve_device(settings.device)
    threads = settings.torch_threads(device.type)
    if threads:
        set_threads(threads)
    return load_tts(spec.bundle, spec.codec, spec.draft, spec.heads,
                    device=str(device), max_batch=settings.max_batch, max_len=settings.max_len,
                    prefix_blocks=settings.prefix_cache_blocks,
                    phoneme_coverage=settings.phoneme_coverage,
                    phoneme_durations=settings.phoneme_durations, runner=settings.runner)


def load_service(settings: Settings, spec: ModelSpec | None = None
                 ) -> tuple[TTSService, GenerationConfig]:
    """Load a model's voice (`load_voice`), resolve its default decoding ("auto" measures), warm
    it up and start its engine thread (blocking: run it in a thread)."""
    import torch

    spec = spec or settings.registry().default
    tts = load_voice(settings, spec)
    service = TTSService(tts, queue_size=settings.queue_size,
                         first_chunk_frames=settings.first_chunk_frames,
                         chunk_frames=settings.chunk_frames,
                         policy=Policy(max_queue_wait_s=settings.max_queue_wait_s,
                                       adaptive=settings.admission_control),
                         prefill_chunk=settings.prefill_chunk, row_budget=settings.row_budget,
                         capacity_margin=settings.capacity_margin,
                         vocoder_thread=settings.vocoder_thread)
    # the warm-up: seeds admission control's model, and checks the default decoding on this bundle
    cfg = default_config(settings, tts)
    service.calibrate(CALIBRATION_TEXT, cfg)
    service.start()
    log.info("model %r (voice %r) loaded from %s on %s (runner %s, %s torch threads)", spec.name,
             tts.name, spec.bundle, tts.engine.device, tts.engine.runner, torch.get_num_threads())
    return service, cfg


def load_models(state: ServerState) -> None:
    """Load, warm up and attach every model not attached yet, one after the other (blocking: run
    it in a thread). A model loaded after the app has shut down is stopped, not attached."""
    for spec in state.registry.models:
        if spec.name in state.models:
            continue
        service, cfg = load_service(state.settings, spec)
        if not state.attach(spec.name, service, owned=True, cfg=cfg):
            service.stop()
            return


async def _load(state: ServerState) -> None:
    try:
        await asyncio.to_thread(load_models, state)
    except Exception as exc:  # noqa: BLE001 — reported by /health and /ready
        log.exception("loading the models failed")
        state.load_error = exc


def create_app(settings: Settings | None = None, service: TTSService | None = None) -> FastAPI:
    """The app. `service`: a started TTSService to serve as the default model instead of loading
    it (the other models of `settings.models`, if any, still load)."""
    settings = settings or Settings()
    state = ServerState(settings)
    if service is not None:
        state.attach(state.registry.default.name, service, owned=False)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        task = asyncio.create_task(_load(state)) if not state.ready else None
        try:
            yield
        finally:
            # every engine thread the app started stops; one still loading stops itself
            # (`load_models`), the loading thread ends on its own
            await asyncio.gather(*(asyncio.to_thread(m.service.stop) for m in state.close()))
            if task is not None and not task.done():
                task.cancel()

    app = FastAPI(title="SpecTTS", version="0.1.0", lifespan=lifespan,
                  description="Low-latency text to speech with speculative decoding; "
                              "OpenAI-compatible speech API")
    app.state.spectts = state
    errors.install(app)
    app.include_router(routes_http.router)
    app.include_router(routes_ws.router)
    app.include_router(routes_playground.router)
    paths = {r.path for r in (*routes_http.router.routes, *routes_ws.router.routes)}
    paths |= {app.openapi_url, app.docs_url, app.redoc_url} | routes_playground.PATHS
    app.add_middleware(ServerMiddleware, state=state, routes=frozenset(paths),
                       open_paths=OPEN_PATHS | routes_playground.PATHS)
    return app
