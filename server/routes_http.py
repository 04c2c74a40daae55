"""HTTP routes: OpenAI's POST /v1/audio/speech (whole file, chunked stream or server-sent events),
GET /v1/models, GET /v1/audio/voices, /health, /ready and /metrics."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine.serving.stream import FINAL, Event, EventKind, SpeechStream
from server import errors
from server.audio import CONTENT_TYPES, StreamEncoder, encode
from server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from server.schemas import STREAM_FORMATS, SpeechRequest
from server.middleware import MODEL_SCOPE_KEY
from server.speech import Guard, ServerState, get_state, start_speech

log = logging.getLogger("spectts.server")
router = APIRouter()
_ERROR = {"description": "OpenAI error: {\"error\": {\"message\", \"type\", \"param\", \"code\"}}"}
_SPEECH_RESPONSES = {
    200: {"description": "audio in the requested format (or text/event-stream for sse)",
          "content": {t: {} for t in {*CONTENT_TYPES.values(), "text/event-stream"}}},
    400: _ERROR, 401: _ERROR, 500: _ERROR, 503: _ERROR, 504: _ERROR}


@router.post("/v1/audio/speech", responses=_SPEECH_RESPONSES, response_class=Response)
async def create_speech(body: SpeechRequest, request: Request,
                        state: ServerState = Depends(get_state)) -> Response:
    """Text to speech, compatible with OpenAI's speech API (plus SpecTTS's decoding fields)."""
    req = state.resolve(body)
    model = req.model.name
    request.scope[MODEL_SCOPE_KEY] = model  # the request metric's model label (ServerMiddleware)
    text = state.check_input(body.input)
    fmt = body.response_format
    if fmt not in state.formats:
        raise errors.bad_request(f"response_format {fmt!r} is not supported by this server "
                                 f"(it has {', '.join(state.formats)})", "unsupported_format",
                                 "response_format")
    streaming = body.stream or body.stream_format == "sse"
    if streaming and fmt not in STREAM_FORMATS:
        raise errors.bad_request(f"streaming supports response_format {' and '.join(STREAM_FORMATS)}"
                                 f", not {fmt!r}", "unsupported_format", "response_format")
    stream = await start_speech(state, text, req)
    guard = Guard(stream, state.settings.request_timeout_s, request)
    if not streaming:
        try:
            audio, final = await _collect(stream, state, model)
        finally:
            guard.close()
        _raise_for(final, guard, state)
        data = await asyncio.to_thread(encode, audio, stream.service.tts.sample_rate, fmt)
        return Response(data, media_type=CONTENT_TYPES[fmt])
    try:  # wait for the first audio: an error before it is still a JSON error with its status
        head = await _head(stream, state, model)
    except BaseException:
        guard.close()
        raise
    if head[-1].kind in FINAL and head[-1].kind != EventKind.DONE:
        guard.close()
        _raise_for(head[-1], guard, state)
    out = _Body(stream, head, StreamEncoder(fmt, stream.service.tts.sample_rate), guard, state,
                model)
    if body.stream_format == "sse":
        return StreamingResponse(_sse(out, len(text)), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return StreamingResponse(out, media_type=CONTENT_TYPES[fmt])


async def _collect(stream: SpeechStream, state: ServerState, model: str
                   ) -> tuple[np.ndarray, Event]:
    audio = []
    async for event in stream.events():
        state.metrics.observe(event, model)
        if event.kind == EventKind.AUDIO:
            audio.append(event.audio)
    joined = np.concatenate(audio) if audio else np.zeros(0, np.float32)
    return joined, event


async def _head(stream: SpeechStream, state: ServerState, model: str) -> list[Event]:
    """Events up to the first audio chunk or the end."""
    head = []
    async for event in stream.events():
        state.metrics.observe(event, model)
        head.append(event)
        if event.kind == EventKind.AUDIO or event.kind in FINAL:
            break
    return head


def _raise_for(final: Event, guard: Guard, state: ServerState) -> None:
    """An APIError for a stream that did not end with "done"."""
    if final.kind == EventKind.REFUSED:  # waited max_queue_wait_s for a stream: 503, Retry-After
        raise errors.to_api_error(final.error, state.settings.retry_after_s)
    if final.kind == EventKind.ERROR:
        log.warning("request failed in the engine: %r", final.error)
        raise errors.engine_failure(final.error)
    if final.kind == EventKind.CANCELLED:
        if guard.timed_out:
            raise errors.timed_out(state.settings.request_timeout_s)
        raise errors.APIError(499, "the client closed the request", code="client_closed")


class _Body:
    """A streamed response body: the container's start, then PCM as it is generated. An error after
    the first byte can only end the stream early (the status has been sent); `final` tells how it
    ended."""

    def __init__(self, stream: SpeechStream, head: list[Event], encoder: StreamEncoder,
                 guard: Guard, state: ServerState, model: str) -> None:
        self.stream, self.head, self.encoder = stream, head, encoder
        self.guard, self.state, self.model = guard, state, model
        self.final: Event | None = None

    async def _events(self) -> AsyncIterator[Event]:
        for event in self.head:
            yield event
        if self.head[-1].kind not in FINAL:
            async for event in self.stream.events():
                self.state.metrics.observe(event, self.model)
                yield event

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            yield self.encoder.start()
            async for event in self._events():
                if event.kind == EventKind.AUDIO:
                    yield self.encoder.chunk(event.audio)
                elif event.kind in FINAL:
                    self.final = event
                    if event.kind == EventKind.ERROR:
                        log.warning("streamed request failed in the engine: %r", event.error)
                    elif self.guard.timed_out:
                        log.warning("streamed request timed out after %g s", self.guard.timeout_s)
        finally:
            self.guard.close()


async def _sse(body: _Body, characters: int) -> AsyncIterator[bytes]:
    """Server-sent events as OpenAI's streaming speech API: speech.audio.delta (base64 audio),
    then speech.audio.done with usage. Usage counts input in characters (what TTS is billed by) and
    output in speech-LM tokens; `stats` adds the engine's numbers (time to first audio, real-time
    factor, mean accepted length)."""
    def event(payload: dict) -> bytes:
        return f"data: {json.dumps(payload)}\n\n".encode()

    chunks = body.__aiter__()
    try:
        start = await anext(chunks)  # the WAV header (or nothing) travels with the first audio
        async for chunk in chunks:
            yield event({"type": "speech.audio.delta",
                         "audio": base64.b64encode(start + chunk).decode()})
            start = b""
    finally:
        await chunks.aclose()
    final = body.final
    if final is not None and final.kind == EventKind.DONE:
        stats = final.stats or {}
        usage = {"input_tokens": characters, "output_tokens": stats.get("tokens", 0),
                 "total_tokens": characters + stats.get("tokens", 0)}
        yield event({"type": "speech.audio.done", "usage": usage, "stats": stats})
    else:
        error = (errors.timed_out(body.guard.timeout_s) if body.guard.timed_out
                 else errors.engine_failure(final.error if final else None))
        yield event({"type": "error", **error.body()})


@router.get("/v1/models")
async def list_models(state: ServerState = Depends(get_state)) -> dict:
    """OpenAI's model list: the served models, the default first (`spectts` and a request without
    `model` name it)."""
    created = int(time.time())
    return {"object": "list", "data": [{"id": m, "object": "model", "created": created,
                                        "owned_by": "spectts"} for m in state.registry.names]}


@router.get("/v1/audio/voices")
async def list_voices(model: str | None = Query(None, max_length=256, description="a served "
                                                "model; default: the default model"),
                      state: ServerState = Depends(get_state)) -> dict:
    """A model's speakers; OpenAI's voice names are accepted as aliases of the default one."""
    served = state.model(model)
    tts = served.tts
    aliases = [v for v in served.voice_ids() if v not in tts.voices]
    return {"model": served.name,
            "voices": [{"id": v, "name": v, "sample_rate": tts.sample_rate,
                        "aliases": aliases if v == tts.default_voice else [],
                        "default": v == tts.default_voice, "formats": list(state.formats)}
                       for v in tts.voices]}


@router.get("/health")
async def health(state: ServerState = Depends(get_state)) -> JSONResponse:
    """Liveness: the process answers (503 only when loading the model failed)."""
    if state.load_error is not None:
        return JSONResponse({"status": "error", "error": str(state.load_error)}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(state: ServerState = Depends(get_state)) -> JSONResponse:
    """Readiness: 200 once every model is loaded and warmed up, 503 before. `models`: each one
    (name, voice, bundle, sample rate, runner, default decoding); the top-level fields are the
    default model's."""
    models = [m.describe() for m in state.loaded()]
    if not state.ready:
        return JSONResponse({"status": "loading", "models": models}, status_code=503,
                            headers={"Retry-After": "5"})
    default = models[0]
    return JSONResponse({"status": "ready", "model": default["name"],
                         "sample_rate": default["sample_rate"], "runner": default["runner"],
                         "default": default["default"], "models": models})


@router.get("/metrics", response_class=Response)
async def metrics(state: ServerState = Depends(get_state)) -> Response:
    """Prometheus exposition."""
    return Response(state.metrics.exposition(), media_type=METRICS_CONTENT_TYPE)
