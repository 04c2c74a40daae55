"""ASGI middleware for HTTP requests: the API key check and request metrics (route, status,
duration until the last byte, streamed bodies included). WebSocket sessions do both themselves."""

from __future__ import annotations

import base64
import binascii
import hmac
import time

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import errors
from server.speech import ServerState

OPEN_PATHS = frozenset({"/health", "/ready"})  # probes answer without the API key
# Browsers cannot set headers on a WebSocket: they offer the key as a subprotocol instead,
# new WebSocket(url, ["spectts", "spectts.bearer." + base64url(key)]); the server answers "spectts"
# (a browser drops a handshake whose answer names none of its offers), never the key.
WS_PROTOCOL = "spectts"
WS_KEY_PROTOCOL = "spectts.bearer."
# a route puts the served model's name here; the request metric's model label ("" when none)
MODEL_SCOPE_KEY = "spectts.model"


def authorized(headers: Headers, state: ServerState) -> bool:
    """True when no key is configured or the request carries `Authorization: Bearer <key>`."""
    key = state.settings.api_key
    if key is None:
        return True
    scheme, _, given = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and _same(given.strip().encode(), state)


def authorized_socket(scope: Scope, state: ServerState) -> bool:
    """A WebSocket handshake: the Authorization header, or the key offered as the subprotocol
    `spectts.bearer.<base64url(key), unpadded>`."""
    if authorized(Headers(scope=scope), state):
        return True
    for offer in scope.get("subprotocols", ()):
        if offer.startswith(WS_KEY_PROTOCOL):
            encoded = offer[len(WS_KEY_PROTOCOL):]
            try:
                given = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
            except (binascii.Error, ValueError):
                continue
            if _same(given, state):
                return True
    return False


def _same(given: bytes, state: ServerState) -> bool:
    return hmac.compare_digest(given, state.settings.api_key.get_secret_value().encode())


class ServerMiddleware:
    def __init__(self, app: ASGIApp, state: ServerState, routes: frozenset[str],
                 open_paths: frozenset[str] = OPEN_PATHS) -> None:
        """`routes`: the app's paths; others are counted as route="other" (bounded labels).
        `open_paths`: answered without the API key."""
        self.app, self.state, self.routes, self.open_paths = app, state, routes, open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        start, status = time.perf_counter(), 500
        route = path if path in self.routes else "other"

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if path not in self.open_paths and not authorized(Headers(scope=scope), self.state):
                await errors.unauthorized().response()(scope, receive, send_status)
                return
            await self.app(scope, receive, send_status)
        finally:
            self.state.metrics.request(route, status, time.perf_counter() - start,
                                       scope.get(MODEL_SCOPE_KEY, ""))
