"""Serving stage 1: the HTTP edge — API key, body limits, JSON decoding, and every error as JSON.

Domain errors become statuses here and only here. Workers AI routes answer errors in Cloudflare's
REST envelope, the OpenAI routes (/v1/...) in OpenAI's `{"error": {...}}` shape, so each family of
clients can read them; nothing else (no traceback, no HTML) ever reaches a client.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from llmpack.runtime.errors import InvalidRequest, LlmpackError, RequestTooLarge
from llmpack.runtime.serve.access import request_id_of
from llmpack.runtime.serve.protocol import decode_json

log = logging.getLogger("llmpack.server")

# Without the API key: the probes, and the documentation (the OpenAPI document, the /docs page and its
# assets, served from the package: a browser cannot send a bearer key to load them, and they hold nothing
# secret; every operation the page tries still needs the key, which its Authorize button takes).
DOCS_ASSETS = "/docs-assets"
OPEN_PATHS = frozenset({"/health", "/ready", "/openapi.json", "/docs", "/docs/oauth2-redirect"})
# Cloudflare API codes for the HTTP-level failures that Workers AI's own table does not cover.
CODE_AUTH, CODE_NO_ROUTE, CODE_METHOD = 10000, 7000, 7001
_OPENAI_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}


class UnknownModel(LlmpackError):
    http_status = 404
    api_code = 3042  # Workers AI: "Invalid model ID"


class UnsupportedMediaType(InvalidRequest):
    http_status = 415


class BodyTimeout(InvalidRequest):
    """The body did not arrive within the body timeout (a slow or stalled client)."""

    http_status = 408


class InternalError(LlmpackError):
    """Any exception no handler expected; the details stay in the server log."""


def json_bytes(payload: object) -> bytes:
    """The one JSON rendering of the server: the bytes `llm-serve infer` prints."""
    return json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n"


def json_response(payload: object, status: int = 200, headers: dict | None = None) -> Response:
    return Response(json_bytes(payload), status_code=status, headers=headers, media_type="application/json")


def error_payload(path: str, status: int, code: int, message: str, param: str | None = None,
                  request_id: str | None = None) -> dict:
    """The error body of the route's API family; `request_id` (the X-Request-ID) rides in the error itself."""
    if path.startswith("/v1/"):
        kind = _OPENAI_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        return {"error": {"message": message, "type": kind, "param": param, "code": str(code),
                          "request_id": request_id}}
    return {"result": {}, "success": False, "errors": [{"code": code, "message": message, "request_id": request_id}],
            "messages": []}


def error_response(scope: Scope, status: int, code: int, message: str, headers: dict | None = None,
                   param: str | None = None) -> Response:
    payload = error_payload(scope["path"], status, code, message, param, request_id_of(scope))
    return json_response(payload, status, headers)


def install_error_handlers(app: FastAPI, retry_after_s: int) -> None:
    """Every failure, FastAPI's and Starlette's own included, answered in the route's JSON error shape."""

    async def domain_error(request: Request, exc: LlmpackError) -> Response:
        headers = {"Retry-After": str(retry_after_s)} if exc.http_status == 429 else None
        if exc.http_status == 408:
            # The client is too slow to send a body: no further request on this connection either.
            headers = {"Connection": "close"}
        return error_response(request.scope, exc.http_status, exc.api_code, exc.message, headers,
                              getattr(exc, "param", None))

    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        path, allowed = request.url.path, (exc.headers or {}).get("Allow", "another method")
        code = {404: CODE_NO_ROUTE, 405: CODE_METHOD}.get(exc.status_code, InvalidRequest.api_code)
        messages = {404: f"no route {path}; see /docs for the routes",
                    405: f"{request.method} is not allowed on {path}; use {allowed}"}
        message = messages.get(exc.status_code, str(exc.detail))
        return error_response(request.scope, exc.status_code, code, message, exc.headers)

    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": ("request",), "msg": "is invalid"}
        where = ".".join(str(part) for part in first.get("loc", ()) if part not in ("body", "path", "query"))
        return error_response(request.scope, 400, InvalidRequest.api_code, f"{where or 'request'}: {first['msg']}")

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        failure = InternalError("internal error; the server log has the details")
        return error_response(request.scope, failure.http_status, failure.api_code, failure.message)

    app.add_exception_handler(LlmpackError, domain_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)


# --- request bodies ----------------------------------------------------------------------------

# `curl -d` sends form-urlencoded, and Cloudflare's own Workers AI curl examples send no content type:
# both carry JSON there, so both are read as JSON; any other declared type is refused.
_FORM = "application/x-www-form-urlencoded"


async def read_json(request: Request, limit: int, timeout_s: float) -> object:
    """The decoded JSON body; 415 for a non-JSON type, 413 past `limit` bytes however it is sent, 408 when
    the whole body takes longer than `timeout_s` (a client trickling bytes would hold its task forever)."""
    content_type = request.headers.get("content-type")
    if content_type is not None:
        media = content_type.split(";", 1)[0].strip().lower()
        if not (media in ("application/json", _FORM) or media.endswith("+json")):
            raise UnsupportedMediaType(f"content type {media!r} is not supported; send application/json")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"the request body is {declared} bytes, the limit is {limit}")
    try:
        async with asyncio.timeout(timeout_s):
            body = await _read_body(request, limit)
    except TimeoutError as exc:
        raise BodyTimeout(f"the request body did not arrive within {timeout_s:g} s; "
                          "send the whole body promptly") from exc
    if not body.strip():
        raise InvalidRequest("the request body is empty; send a JSON object with 'prompt' or 'messages'")
    return decode_json(body)


async def _read_body(request: Request, limit: int) -> bytes:
    body = bytearray()
    # Counted as it arrives: a chunked body has no Content-Length to check up front.
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestTooLarge(f"the request body is over the limit of {limit} bytes")
    return bytes(body)


# --- middleware (plain ASGI: BaseHTTPMiddleware would break streaming and disconnect detection) ---


class ApiKeyMiddleware:
    """Refuse every route but the probes without `Authorization: Bearer <key>`; constant-time compare."""

    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app = app
        self.key = api_key.encode("utf-8") if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or self.key is None or path in OPEN_PATHS or path.startswith(DOCS_ASSETS + "/"):
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            await self.app(scope, receive, send)
            return
        # The key itself is never logged or echoed.
        message = "missing or wrong API key; send the header 'Authorization: Bearer <key>'"
        response = error_response(scope, 401, CODE_AUTH, message, {"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
