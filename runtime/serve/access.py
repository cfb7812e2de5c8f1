"""Serve wing, outermost layer: every request's id, its metrics and its one access-log line.

The id is the client's `X-Request-ID` when it sends a usable one (a proxy's or a tracing system's), else
generated; it is echoed in the `X-Request-ID` response header, in error bodies (http_edge) and in the
server log, so one request can be followed from the client to the log. One access-log line per request
(logger `llmpack.access`, INFO) says what was asked and what it cost: method, route, status, prompt and
completion tokens, time to first token and in all, and the id.
"""

from __future__ import annotations

import logging
import re
import secrets
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmpack.runtime.serve.metrics import Metrics

access_log = logging.getLogger("llmpack.access")

REQUEST_ID_HEADER = b"x-request-id"
# A client's id is used as given when it is short and plain (it lands in logs and headers verbatim).
_USABLE_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
STATUS_CLIENT_GONE = 499  # nginx's "client closed request": no response was started


def request_id_of(scope: Scope) -> str | None:
    """The id RequestRecord gave this request (None outside it, e.g. in unit tests of a bare route)."""
    return scope.get("state", {}).get("request_id")


def choose_request_id(headers: list[tuple[bytes, bytes]]) -> str:
    given = next((value for name, value in headers if name == REQUEST_ID_HEADER), b"")
    text = given.decode("latin-1")
    return text if _USABLE_ID.fullmatch(text) else secrets.token_hex(12)


class RequestRecord:
    """Plain ASGI (BaseHTTPMiddleware would break streaming and disconnect detection): ids, metrics, log line.

    Routes that run a generation leave it in `scope["state"]["generation"]`; its usage and first-token time
    go into the line once the response (a whole stream included) is done.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        request_id = choose_request_id(scope["headers"])
        scope.setdefault("state", {})["request_id"] = request_id
        status = STATUS_CLIENT_GONE

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (REQUEST_ID_HEADER, request_id.encode("latin-1"))]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            status = 500
            raise
        finally:
            route = getattr(scope.get("route"), "path_format", None)
            # never the raw path as a label: unbounded series
            self.metrics.request_done(route or "unmatched", status, time.monotonic() - started)
            access_log.info("%s", access_line(scope, route or printable_path(scope["path"]), status, started,
                                              request_id))


def printable_path(path: str, limit: int = 200) -> str:
    """A path no route matched (or the key check stopped first), safe for one log line: no spaces or controls."""
    return "".join(c if c.isprintable() and c != " " else f"%{ord(c):02X}" for c in path[:limit])


def access_line(scope: Scope, route: str, status: int, started: float, request_id: str) -> str:
    """`POST /v1/chat/completions 200 prompt=31 completion=64 ttft_ms=112.4 total_ms=1530.2 id=…`"""
    parts = [scope["method"], route, str(status)]
    generation = scope.get("state", {}).get("generation")
    if generation is not None:
        usage = generation.finished.usage if generation.finished is not None else None
        if usage is not None:
            parts += [f"prompt={usage.prompt_tokens}", f"completion={usage.completion_tokens}"]
        if generation.first_text_at is not None:
            parts.append(f"ttft_ms={1000 * (generation.first_text_at - started):.1f}")
    parts += [f"total_ms={1000 * (time.monotonic() - started):.1f}", f"id={request_id}"]
    return " ".join(parts)
