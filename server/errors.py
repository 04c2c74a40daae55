"""Every error the server reports, in one place, in OpenAI's shape.

`{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}` with the HTTP status below. Routes
raise `APIError` (or let `ValueError` from the engine be turned into one by `to_api_error`); the
WebSocket sends the same body with `"type": "error"` added around it and keeps the socket open.

| cause                                           | status | type          | code                |
|-------------------------------------------------|--------|---------------|---------------------|
| invalid JSON, wrong types, out-of-range fields  | 400    | invalid_req.. | invalid_value       |
| empty / over-long input, unspeakable text       | 400    | invalid_req.. | invalid_input / ... |
| WebSocket text not yet spoken over the cap      | 400    | invalid_req.. | buffer_full         |
| unknown model / voice / format                  | 400    | invalid_req.. | unknown_model / ... |
| bad decoding settings (GenerationConfig)        | 400    | invalid_req.. | invalid_value       |
| missing or wrong API key                        | 401    | invalid_req.. | invalid_api_key     |
| unknown path / method                           | 404/405| invalid_req.. | not_found / ...     |
| queue full, or queued max_queue_wait_s (Busy)   | 503    | server_error  | server_busy         |
| model not loaded yet                            | 503    | server_error  | not_ready           |
| generation timed out                            | 504    | server_error  | timeout             |
| a failure inside the engine for this request    | 500    | server_error  | internal_error      |
(invalid_req.. = invalid_request_error)
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.serving.service import ServiceBusy
from engine.types import ConfigError

log = logging.getLogger("spectts.server")


class APIError(Exception):
    """An error with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, *, code: str, param: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, code: str = "invalid_value", param: str | None = None) -> APIError:
    return APIError(400, message, code=code, param=param)


def unauthorized() -> APIError:
    return APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                    code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def not_ready() -> APIError:
    return APIError(503, "the model is still loading", code="not_ready",
                    headers={"Retry-After": "5"})


def busy(retry_after_s: int, reason: str = "the request queue is full") -> APIError:
    return APIError(503, f"the server is busy ({reason}); retry later",
                    code="server_busy", headers={"Retry-After": str(retry_after_s)})


def timed_out(seconds: float) -> APIError:
    return APIError(504, f"generation took longer than {seconds:g} s and was stopped", code="timeout")


def engine_failure(exc: BaseException | None) -> APIError:
    """A failure inside the engine for one request (Event("error")): its message, never a trace."""
    detail = f": {type(exc).__name__}: {exc}" if exc is not None else ""
    return APIError(500, f"speech generation failed{detail}", code="internal_error")


def to_api_error(exc: BaseException, retry_after_s: int = 1) -> APIError:
    """The APIError for anything a request can raise (HTTP and WebSocket use this alike)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ServiceBusy):
        return busy(retry_after_s, str(exc))
    if isinstance(exc, ConfigError):  # a generation setting the engine cannot run
        return bad_request(str(exc), param=exc.param)
    if isinstance(exc, ValueError):  # the engine's and the frontend's "this request is invalid"
        return bad_request(str(exc))
    log.error("unexpected error", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}", code="internal_error")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable line and the offending field for pydantic's error list."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if not loc and first.get("type") in ("model_attributes_type", "dict_type", "missing"):
        return ("the request body must be a JSON object, sent with Content-Type: "
                "application/json"), None
    msg = first.get("msg", "invalid value")
    return (f"{param}: {msg}" if param else msg), param


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return bad_request(message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        err = APIError(exc.status_code, str(exc.detail), code=code, headers=exc.headers)
        return err.response()

    @app.exception_handler(ServiceBusy)
    async def _busy(request: Request, exc: ServiceBusy) -> JSONResponse:
        return busy(request.app.state.settings.retry_after_s).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return to_api_error(exc).response()
