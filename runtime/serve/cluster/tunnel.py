"""Serve wing, cluster part: one HTTP request carried from the ingress to a replica's own FastAPI app and back.

Ray Serve's HTTP proxy hands a deployment the request's headers only (the body is pulled later), so a router
in front of the engine replicas could never see a prompt. The ingress therefore reads the body, names the
prompt text the prefix router matches on, and sends (scope, body) to a replica; the replica runs the very
app `llm-serve run` serves over them and streams the ASGI messages back. Routes, status codes, headers,
errors and SSE bytes are the app's own. No ray import: the ingress is handed the handle and Ray's error types.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from llmpack.runtime.errors import CapacityExceeded, LlmpackError
from llmpack.runtime.serve.http_edge import BodyTimeout, error_response
from llmpack.runtime.serve.streaming import error_event

log = logging.getLogger("llmpack.cluster")

REPLICA_HEADER = b"x-llmpack-replica"  # which replica answered: operators' tracing, and the tests' evidence
_SCOPE_KEYS = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "query_string",
               "root_path", "headers", "client", "server")


class ReplicaLost(LlmpackError):
    """The replica serving the request died; Ray restarts it. Nothing was generated twice."""

    http_status = 503
    api_code = 3040


@dataclass(frozen=True)
class Forwarded:
    """What crosses to a replica. `prompt` is the attribute Ray's PrefixCacheAffinityRouter matches on."""

    scope: dict
    body: bytes
    prompt: str


def prompt_text(body: bytes) -> str:
    """The text a request's prompt starts with, in order (system prompt, earlier turns, the new one): both API
    families' `prompt` or `messages`. "" when there is none (probes, /tokenize of ids, a malformed body)."""
    try:
        request = json.loads(body) if body else None
    except ValueError:
        return ""
    if not isinstance(request, dict):
        return ""
    prompt = request.get("prompt")
    if isinstance(prompt, str):
        return prompt
    messages = request.get("messages")
    if not isinstance(messages, list):
        return ""
    parts = [f"{m.get('role')}:{m.get('content')}\n" for m in messages if isinstance(m, dict)]
    return "".join(parts)


def portable(scope: Scope) -> dict:
    """The picklable part of an HTTP scope (no app, router or state objects)."""
    return {key: scope[key] for key in _SCOPE_KEYS if key in scope}


async def replay(app: ASGIApp, scope: dict, body: bytes, replica: str) -> AsyncIterator[dict]:
    """Run `app` on one request and yield what it sends. If the consumer goes away (the client disconnected,
    Ray cancelled the call), the app sees http.disconnect, as from a dropped connection, and is cancelled."""
    sent: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        if messages:
            return messages.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            # Ray's proxy adds the request's X-Request-ID to the response itself: the app's copy would repeat it.
            headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"x-request-id"]
            message = {**message, "headers": [*headers, (REPLICA_HEADER, replica.encode())]}
        await sent.put(message)

    async def run() -> None:
        try:
            await app({**scope, "state": {}}, receive, send)
        finally:
            await sent.put(None)

    task = asyncio.create_task(run())
    try:
        while (message := await sent.get()) is not None:
            yield message
        await task  # the app's own exception, if any
    finally:
        gone.set()
        if not task.done():
            await asyncio.sleep(0)  # the app's disconnect watcher cancels its generation first
            task.cancel()


class Forwarder:
    """The ingress: an ASGI app that reads a request's body and streams a replica's answer to it.

    `call(forwarded)` returns an async iterator of the replica's ASGI messages. A replica lost before it
    answered is retried once on another (nothing ran for the client yet); one lost mid-answer ends the
    stream with the app's error event, or a 503 when no byte went out. `busy` errors (Ray's queue at the
    ingress is full) get the same 429 a full `llm-serve run` gives.
    """

    def __init__(self, call: Callable, lost: tuple[type[BaseException], ...], busy: tuple[type[BaseException], ...],
                 max_body_bytes: int, body_timeout_s: float, retry_after_s: int):
        self.call, self.lost, self.busy = call, lost, busy
        self.max_body_bytes, self.body_timeout_s, self.retry_after_s = max_body_bytes, body_timeout_s, retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await _lifespan(receive, send)
        if scope["type"] != "http":
            return
        try:
            body = await asyncio.wait_for(self._body(receive), self.body_timeout_s)
        except TimeoutError:
            failure = BodyTimeout(f"the request body did not arrive within {self.body_timeout_s:g} s")
            return await self._fail(scope, send, failure, {"Connection": "close"})
        forwarded = Forwarded(portable(scope), body, prompt_text(body))
        for last in (False, True):
            if not await self._relay(forwarded, scope, send, last):
                return

    async def _relay(self, forwarded: Forwarded, scope: Scope, send: Send, last: bool) -> bool:
        """Send the replica's answer, or the error that ends it; True: the replica was lost before it answered
        and this was not the `last` try, so the caller sends the request to another."""
        started = False
        try:
            async for message in self.call(forwarded):
                started = started or message["type"] == "http.response.start"
                await send(message)
        except self.busy:
            await self._fail(scope, send, CapacityExceeded("every replica is at capacity; retry after the time "
                                                           "in Retry-After"), {"Retry-After": str(self.retry_after_s)})
        except self.lost as exc:
            log.warning("replica lost on %s (%s)", scope["path"], type(exc).__name__)
            failure = ReplicaLost("the replica serving this request stopped; send it again")
            if started:  # the answer's start went out: end it as the app ends a failed stream
                await send({"type": "http.response.body", "body": error_event(scope, failure), "more_body": False})
            elif not last:
                return True
            else:
                await self._fail(scope, send, failure)
        return False

    async def _body(self, receive: Receive) -> bytes:
        # One byte over the limit is enough for the replica's app to answer 413; the rest is never held.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes or not message.get("more_body"):
                break
        return b"".join(chunks)[: self.max_body_bytes + 1]

    @staticmethod
    async def _fail(scope: Scope, send: Send, failure: LlmpackError, headers: dict | None = None) -> None:
        response = error_response(scope, failure.http_status, failure.api_code, failure.message, headers)
        await response(scope, _nothing, send)


async def _nothing() -> dict:
    return {"type": "http.disconnect"}


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return

