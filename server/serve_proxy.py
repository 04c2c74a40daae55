"""ASGI middleware for Ray Serve's HTTP proxy: what the proxy itself answers, in the API's shape.

Serve loads it in its proxy actor from RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH
(`server.serve_proxy:middlewares`; the launcher sets it, a KubeRay head sets it in its env). The
replicas answer every request they receive themselves; the proxy answers only when no replica did:
- back-pressure (every replica at max_ongoing_requests and the router's queue full: 503 with
  Retry-After), no replica (503), a replica that died before answering (500): the proxy's plain-text
  response becomes `{"error": {"message", "type", "param", "code"}}` as `server.errors` writes it;
- the same on a WebSocket (Serve would send an HTTP response to a WebSocket handshake, which the
  client sees as a failed handshake): the socket is accepted, gets the WebSocket protocol's error
  message (`server_busy` with `retry_after` for back-pressure) and is closed (1013: try again later;
  1011 otherwise);
- a WebSocket whose replica dies during the session (the proxy ends it without a close frame): an
  error message (`replica_failed`) and close 1011, at once, never a hang;
- an HTTP stream whose replica dies after the first byte: the connection is aborted, so the client
  sees an incomplete body instead of a file that merely ends early.
This module imports no torch (it runs in the proxy process): the error body is written here.
"""

from __future__ import annotations

import json
import logging

from starlette.middleware import Middleware

log = logging.getLogger("spectts.serve_proxy")
_PROXY_ERRORS = {  # status the proxy answers with -> (code, message)
    503: ("server_busy", "the server is busy (every replica is at capacity); retry later"),
    429: ("server_busy", "the server is busy (every replica is at capacity); retry later"),
    408: ("timeout", "the request timed out in the proxy"),
    500: ("replica_failed", "the replica serving this request failed"),
}


def error_body(status: int, detail: str = "") -> dict:
    code, message = _PROXY_ERRORS.get(status, ("internal_error", "the proxy failed"))
    if code != "server_busy" and detail:
        message = f"{message}: {detail}"
    kind = "invalid_request_error" if status < 500 and status != 429 and status != 408 \
        else "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class ReplicaStreamAborted(RuntimeError):
    """An HTTP response body ended without its last chunk: the replica serving it died."""


class ProxyErrors:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _http(self, scope, receive, send) -> None:
        own = {"status": None, "buffer": [], "done": False}

        async def intercept(message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                headers = dict(message.get("headers", []))
                plain = headers.get(b"content-type", b"").startswith(b"text/plain")
                if plain and message["status"] in _PROXY_ERRORS:
                    own["status"], own["start"] = message["status"], message
                    return
            elif kind == "http.response.body":
                if own["status"] is not None:  # the proxy's own error: collect its text
                    own["buffer"].append(message.get("body", b""))
                    if not message.get("more_body", False):
                        await self._send_json(send, own["start"], b"".join(own["buffer"]))
                    return
                if not message.get("more_body", False):
                    own["done"] = True
            await send(message)

        started = False

        async def track(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await intercept(message)

        await self.app(scope, receive, track)
        if started and not own["done"] and own["status"] is None:
            # the body never got its last chunk: abort the connection (uvicorn drops it)
            raise ReplicaStreamAborted("the replica serving this stream failed")

    async def _send_json(self, send, start: dict, text: bytes) -> None:
        status = start["status"]
        body = json.dumps(error_body(status, text.decode(errors="replace").strip())).encode()
        headers = [(k, v) for k, v in start.get("headers", [])
                   if k.lower() not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _websocket(self, scope, receive, send) -> None:
        state = {"accepted": False, "closed": False, "refused": None, "text": []}

        async def intercept(message) -> None:
            kind = message["type"]
            if kind == "websocket.accept":
                state["accepted"] = True
            elif kind in ("websocket.close", "websocket.http.response.start"):
                state["closed"] = True
            elif kind == "http.response.start" and not state["accepted"]:
                state["refused"] = message  # the proxy's HTTP answer to a handshake
                return
            elif kind == "http.response.body" and state["refused"] is not None:
                state["text"].append(message.get("body", b""))
                return
            await send(message)

        try:
            await self.app(scope, receive, intercept)
        finally:
            if state["refused"] is not None and not state["accepted"]:
                await self._refuse_socket(send, state["refused"], b"".join(state["text"]))
            elif state["accepted"] and not state["closed"]:
                # the replica's session ended without a close frame: it died
                payload = {"type": "error", **error_body(500, "its session was lost")}
                try:
                    await send({"type": "websocket.send", "text": json.dumps(payload)})
                    await send({"type": "websocket.close", "code": 1011,
                                "reason": "replica failed"})
                except Exception:  # noqa: BLE001 — the client has gone already
                    pass

    async def _refuse_socket(self, send, start: dict, text: bytes) -> None:
        status = start["status"]
        payload = {"type": "error", **error_body(status, text.decode(errors="replace").strip())}
        retry = dict(start.get("headers", [])).get(b"retry-after")
        if retry is not None:  # as the single server's session refusal: HTTP's Retry-After
            payload["retry_after"] = int(retry)
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": json.dumps(payload)})
        busy = payload["error"]["code"] == "server_busy"
        await send({"type": "websocket.close", "code": 1013 if busy else 1011,
                    "reason": "server busy" if busy else "no replica"})


def middlewares() -> list[Middleware]:
    """The callback Serve's proxy calls (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH)."""
    return [Middleware(ProxyErrors)]
