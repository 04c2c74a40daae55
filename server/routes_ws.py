"""WebSocket /v1/audio/speech/stream: text in pieces (from an LLM, word by word), audio out per
sentence as soon as each sentence is complete — the protocol vLLM-Omni serves at the same path.

Client -> server (JSON text frames, each with a "type"):
    {"type": "session.config", ...}   the HTTP request's fields except input (model: which served
                                      model speaks; voice, speed, decoding, accept, tau, beta,
                                      min_ratio, temperature, top_k, seed, ...); stays in effect for
                                      every later session on the socket
    {"type": "input.text", "text": "..."}   any number; the first one starts a session. A session's
                                      total text has no limit: each message, and the text received
                                      and not yet spoken, may have up to max_input_chars characters
                                      (a message past that is refused, code "buffer_full", and the
                                      session goes on: send it again once more has been spoken)
    {"type": "input.done"}            no more text: speak the rest, then end the session (a session
                                      whose text is blank is refused, as HTTP refuses an empty input)
    {"type": "cancel"}                stop the running session now
Server -> client:
    {"type": "session.queued", "position": n}   every stream is taken: the session waits in FIFO
        order (position 1: next); sent again as the position changes. Text may be sent meanwhile.
    {"type": "audio.start", "sentence_index": i, "sentence_text": "...", "format": "pcm_s16le",
     "sample_rate": N, "channels": 1}
    binary frames: PCM16 LE mono of sentence i, as soon as the engine accepts it
    {"type": "audio.done", "sentence_index": i, "stats": {...}}
    {"type": "session.done", "status": "completed" | "cancelled" | "error", "stats": {...}}
        (tokens, mean_accepted_length, time_to_first_audio_seconds, real_time_factor, ...)
    {"type": "error", "error": {"message", "type", "param", "code"}}   a refused message or a failed
        session; the socket stays open for the next one. A session refused at capacity (code
        "server_busy": the queue is full, or it waited max_queue_wait_s queued, then followed by
        session.done with status "refused") also carries "retry_after": seconds, as HTTP's
        Retry-After header.
A client that disconnects stops its generation. With an API key set, send `Authorization: Bearer
<key>`, or (browsers cannot set headers on a WebSocket) offer the subprotocols
["spectts", "spectts.bearer.<base64url(key)>"] (server.middleware.authorized_socket).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from engine.serving.stream import Event, EventKind, SpeechStream
from server import errors
from server.audio import pcm16
from server.middleware import WS_PROTOCOL, authorized_socket
from server.schemas import InputText, SessionConfig
from server.speech import Guard, Resolved, ServerState

log = logging.getLogger("spectts.server")
router = APIRouter()
ROUTE = "/v1/audio/speech/stream"
_STATUS = {EventKind.DONE: 200, EventKind.CANCELLED: 499, EventKind.ERROR: 500,
           EventKind.REFUSED: 503}
_END = {EventKind.DONE: "completed", EventKind.CANCELLED: "cancelled", EventKind.REFUSED: "refused"}


@router.websocket(ROUTE)
async def speech_stream(ws: WebSocket) -> None:
    state: ServerState = ws.app.state.spectts
    await ws.accept(subprotocol=WS_PROTOCOL if WS_PROTOCOL in ws.scope.get("subprotocols", ())
                    else None)
    if not authorized_socket(ws.scope, state):
        await ws.send_json({"type": "error", **errors.unauthorized().body()})
        await ws.close(code=1008, reason="missing or invalid API key")
        state.metrics.request(ROUTE, 401, 0.0)
        return
    session = _Socket(ws, state)
    try:
        await session.serve()
    except WebSocketDisconnect:
        pass
    finally:
        session.abort()


class _Socket:
    """One connection: reads client messages; a pump task sends one session's events."""

    def __init__(self, ws: WebSocket, state: ServerState) -> None:
        self.ws, self.state = ws, state
        self.config: Resolved | None = None  # the model, config, speed and voice of session.config
        self.stream: SpeechStream | None = None
        self.pump: asyncio.Task | None = None
        self.blank = True  # the session's text so far is only whitespace
        self._send = asyncio.Lock()

    async def serve(self) -> None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is None:
                await self.error(errors.bad_request("binary frames are not accepted; send JSON text",
                                                    "invalid_message"))
                continue
            try:
                await self.handle(message["text"])
            except errors.APIError as exc:
                await self.error(exc)
            except Exception as exc:  # noqa: BLE001 — report it, keep the socket
                await self.error(errors.to_api_error(exc, self.state.settings.retry_after_s))

    async def handle(self, text: str) -> None:
        try:
            msg = json.loads(text)
        except ValueError:
            raise errors.bad_request("the message is not valid JSON", "invalid_json") from None
        kind = msg.get("type") if isinstance(msg, dict) else None
        if kind == "session.config":
            if self.stream is not None:
                raise errors.bad_request("a session is running: send input.done or cancel first",
                                         "session_active")
            try:
                self.config = self.state.resolve(_validate(SessionConfig, msg))
            except errors.APIError as exc:
                self.refused(exc)
                raise
        elif kind == "input.text":
            piece = _validate(InputText, msg).text
            limit = self.state.settings.max_input_chars
            if len(piece) > limit:
                raise errors.bad_request(f"the message has {len(piece)} characters; the limit is "
                                         f"{limit}", "input_too_long", "text")
            if self.stream is None:
                await self.start()
            unspoken = self.stream.unspoken_chars()
            if unspoken + len(piece) > limit:  # refused, not added: the client sends it again
                raise errors.bad_request(
                    f"the session has {unspoken} characters received and not yet spoken; with this "
                    f"message's {len(piece)} that is over the limit of {limit}: the message was not "
                    f"added, send it again once more has been spoken", "buffer_full", "text")
            self.blank = self.blank and not piece.strip()
            self.stream.add_text(piece)
        elif kind == "input.done":
            if self.stream is None:
                raise errors.bad_request("no input.text was sent before input.done", "invalid_input")
            if self.blank:
                self.stream.cancel()
                raise errors.bad_request("input is empty", "invalid_input", "text")
            self.stream.end_input()
        elif kind == "cancel":
            if self.stream is not None:
                self.stream.cancel()
        else:
            raise errors.bad_request(f"unknown message type {kind!r}; expected session.config, "
                                     "input.text, input.done or cancel", "invalid_message", "type")

    async def start(self) -> None:
        """Open a session's stream with the last session.config."""
        try:
            if self.config is None:
                raise errors.bad_request("send session.config before input.text",
                                         "no_session_config")
            req = self.config
            try:
                stream = req.model.service.open(req.cfg, req.speed, voice=req.voice)
            except Exception as exc:  # noqa: BLE001 — ServiceBusy: 503; ConfigError: 400
                raise errors.to_api_error(exc, self.state.settings.retry_after_s) from None
        except errors.APIError as exc:
            self.refused(exc, self.config.model.name if self.config is not None else "")
            raise
        self.stream, self.blank = stream, True
        self.pump = asyncio.create_task(self.run(stream, self.config.model.name))

    async def run(self, stream: SpeechStream, model: str) -> None:
        """Send one session's events (spoken by `model`); the session ends with session.done."""
        guard = Guard(stream, self.state.settings.request_timeout_s)
        rate = stream.service.tts.sample_rate
        final = Event(EventKind.ERROR)
        try:
            async for event in stream.events():
                self.state.metrics.observe(event, model)
                final = event
                if event.kind == EventKind.QUEUED:
                    await self.send({"type": "session.queued", "position": event.position})
                elif event.kind == EventKind.SENTENCE_START:
                    await self.send({"type": "audio.start", "sentence_index": event.sentence_index,
                                     "sentence_text": event.text, "format": "pcm_s16le",
                                     "sample_rate": rate, "channels": 1})
                elif event.kind == EventKind.AUDIO:
                    async with self._send:
                        await self.ws.send_bytes(pcm16(event.audio))
                elif event.kind == EventKind.SENTENCE_DONE:
                    await self.send({"type": "audio.done", "sentence_index": event.sentence_index,
                                     "stats": event.stats})
            if final.kind == EventKind.ERROR:
                await self.error(errors.engine_failure(final.error))
            elif final.kind == EventKind.REFUSED:
                await self.error(errors.to_api_error(final.error,
                                                     self.state.settings.retry_after_s))
            elif guard.timed_out:
                await self.error(errors.timed_out(guard.timeout_s))
            status = _END.get(final.kind, "error")
            self._end(stream)  # before session.done: the client may start the next one at once
            await self.send({"type": "session.done", "status": status,
                             "stats": final.stats or stream.summary()})
        except Exception:  # noqa: BLE001 — the socket is gone: stop generating
            stream.cancel()
        finally:
            guard.close()
            code = 504 if guard.timed_out else _STATUS.get(final.kind, 500)
            self.state.metrics.request(ROUTE, code, time.perf_counter() - guard.started, model)
            self._end(stream)

    def _end(self, stream: SpeechStream) -> None:
        if self.stream is stream:
            self.stream, self.pump = None, None

    def refused(self, err: errors.APIError, model: str = "") -> None:
        """A session refused before it started (a bad session.config, at capacity, not ready)
        counts as a request with the refusal's status, as an HTTP one would."""
        self.state.metrics.request(ROUTE, err.status, 0.0, model)

    async def send(self, payload: dict) -> None:
        async with self._send:
            await self.ws.send_text(json.dumps(payload))

    async def error(self, err: errors.APIError) -> None:
        payload = {"type": "error", **err.body()}
        if "Retry-After" in err.headers:  # HTTP's header, as a field: when to try again (seconds)
            payload["retry_after"] = int(err.headers["Retry-After"])
        await self.send(payload)

    def abort(self) -> None:
        """The client has gone: stop the running session."""
        if self.stream is not None:
            self.stream.cancel()
        if self.pump is not None:
            self.pump.cancel()


def _validate(model: type, msg: dict):
    try:
        return model.model_validate(msg)
    except ValidationError as exc:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())) or None
        raise errors.bad_request(f"{param}: {first.get('msg', 'invalid value')}" if param
                                 else "invalid message", param=param) from None
