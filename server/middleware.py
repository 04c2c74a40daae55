"""ASGI middleware for HTTP requests: the API key check and request metrics (route, status,
duration until the last byte, streamed bodies included). WebSocket sessions do both themselves."""

from __future__ import annotations

import hmac
import time

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import errors
from server.speech import ServerState

OPEN_PATHS = frozenset({"/health", "/ready"})  # probes answer without the API key


def authorized(headers: Headers, state: ServerState) -> bool:
    """True when no key is configured or the request carries `Authorization: Bearer <key>`."""
    key = state.settings.api_key
    if key is None:
        return True
    scheme, _, given = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                              key.get_secret_value().encode())


class ServerMiddleware:
    def __init__(self, app: ASGIApp, state: ServerState, routes: frozenset[str]) -> None:
        """`routes`: the app's paths; others are counted as route="other" (bounded labels)."""
        self.app, self.state, self.routes = app, state, routes

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
            if path not in OPEN_PATHS and not authorized(Headers(scope=scope), self.state):
                await errors.unauthorized().response()(scope, receive, send_status)
                return
            await self.app(scope, receive, send_status)
        finally:
            self.state.metrics.request(route, status, time.perf_counter() - start)
