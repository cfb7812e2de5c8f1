"""Serve wing: the FastAPI app — Workers AI routes, probes and metrics over the engine.

Thin on purpose: each route is parse (protocol) → ids (engine, once) → admit (admission) → wire format, and
all generation behaviour comes from the engine. The OpenAI-compatible routes live in openai_api.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi_offline import FastAPIOffline
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse, Response
from starlette.types import Scope

from llmpack.runtime.chat_format import NoChat
from llmpack.runtime.errors import LlmpackError
from llmpack.runtime.request import GenerationRequest
from llmpack.runtime.serve import openai_api, token_routes
from llmpack.runtime.serve import openapi_doc as doc
from llmpack.runtime.serve.access import RequestRecord
from llmpack.runtime.serve.admission import Admission
from llmpack.runtime.serve.http_edge import (
    DOCS_ASSETS,
    ApiKeyMiddleware,
    UnknownModel,
    install_error_handlers,
    json_response,
    read_json,
)
from llmpack.runtime.serve.metrics import CONTENT_TYPE, Metrics
from llmpack.runtime.serve.protocol import (
    MODEL_NAME,
    SSE_DONE,
    completion_json,
    parse_request,
    sse_event,
    sse_usage_event,
)
from llmpack.runtime.serve.settings import ServerSettings
from llmpack.runtime.serve.streaming import EventStreamResponse, Generation, admit, error_event

log = logging.getLogger("llmpack.server")

# A tiny generation: it runs prefill and decode once, so the first real request pays no warm-up; through
# the chat template, so the template and system prompt every raw=false request begins with are already in
# the prefix cache.
WARMUP_BODY = {"prompt": "Hello", "max_tokens": 2, "temperature": 0}
_PADDING = "abcdefghijklmnopqrstuvwxyz0123456789" * 2
INLINE_TOKENIZE_CHARS = 1000  # requests with at most this much text are tokenized on the event loop


def register_prefix_cache(metrics: Metrics, cache) -> None:
    """The prefix cache's counters on /metrics (none when the backend or the settings leave it off)."""
    if cache is None:
        return
    metrics.gauge("llmpack_prefix_cache_hits_total", "Requests that started from a kept sequence's KV cache.",
                  lambda: cache.hits, kind="counter")
    metrics.gauge("llmpack_prefix_cache_reused_tokens_total", "Prompt tokens not computed thanks to the prefix cache.",
                  lambda: cache.reused_tokens, kind="counter")
    metrics.gauge("llmpack_prefix_cache_bytes", "Bytes of KV copies the prefix cache holds.", lambda: cache.nbytes)


def register_speculation(metrics: Metrics, scheduler) -> None:
    """Speculative decoding's counters (none when it is off): tokens proposed and tokens kept."""
    if scheduler.speculation is None:
        return
    metrics.gauge("llmpack_speculated_tokens_total", "Tokens proposed by prompt lookup and checked in a step.",
                  lambda: scheduler.proposed, kind="counter")
    metrics.gauge("llmpack_speculated_tokens_accepted_total", "Proposed tokens accepted (each saved a step).",
                  lambda: scheduler.accepted, kind="counter")


class ServerState:
    """What the routes share: the engine, admission, the metrics and readiness."""

    def __init__(self, engine, settings: ServerSettings):
        self.engine = engine
        self.settings = settings
        self.metrics = Metrics()
        self.admission = Admission(engine, settings.max_queue, self.metrics)
        register_prefix_cache(self.metrics, engine.prefix_cache)
        register_speculation(self.metrics, engine.scheduler)
        engine.scheduler.on_step = self.metrics.decode_step
        # The Workers AI id first: it is what existing clients ask for.
        self.models = tuple(dict.fromkeys((MODEL_NAME, settings.served_model_name or engine.model_name)))
        self.started_at = int(time.time())
        self.ready = False
        self.not_ready_reason = "the warm-up generation has not finished"

    def check_model(self, model: str) -> None:
        if model not in self.models:
            raise UnknownModel(f"no such model {model!r}; this server runs {' or '.join(self.models)}")

    async def body(self, request: Request) -> object:
        """The decoded JSON body, within the size and time limits (413 / 408 / 415 / 400)."""
        return await read_json(request, self.settings.max_body_bytes, self.settings.body_timeout_s)

    async def read_request(self, request: Request) -> tuple[GenerationRequest, list[int]]:
        """Body → validated request and its prompt ids, within the input limit (400 / 3030 before it queues)."""
        parsed = parse_request(await self.body(request))
        return parsed, await self.prompt_ids(parsed)

    async def prompt_ids(self, parsed: GenerationRequest) -> list[int]:
        # Done once per request: the ids travel with it to the engine. A long conversation takes a while
        # to tokenize, so it goes to a worker thread, off the event loop the streams are written from;
        # a short one is tokenized in place, no slower than the hop (Llama-2's tokenizer: 1000 chars 0.09 ms,
        # the hop 0.12 ms on an idle loop; bench/tokenize_cost.py).
        if parsed.text_chars <= INLINE_TOKENIZE_CHARS:
            return self.engine.request_ids(parsed)
        return await run_in_threadpool(self.engine.request_ids, parsed)

    async def admit(self, request: Request, parsed: GenerationRequest, prompt_ids: list[int]) -> Generation:
        generation = await admit(self.admission, request, parsed, prompt_ids, self.engine.tokenizer)
        request.state.generation = generation  # its tokens and first-text time go into the access-log line
        return generation

    async def drain(self) -> None:
        """On SIGTERM/SIGINT: let in-flight requests finish for shutdown_timeout_s, then cancel the rest.

        Cancelled here rather than by uvicorn's deadline, each still ends with a final event: a 503
        JSON error, or a stream's error event (code 3040), never a connection cut mid-body.
        """
        self.ready, self.not_ready_reason = False, "the server is shutting down"
        timeout = self.settings.shutdown_timeout_s
        log.info("shutting down: %d requests in flight get up to %g s to finish", self.admission.in_flight, timeout)
        deadline = time.monotonic() + timeout
        while self.admission.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        cancelled = self.admission.in_flight
        await run_in_threadpool(self.admission.close, timeout)
        outcome = f"{cancelled} requests cancelled at the timeout" if cancelled else "every request finished"
        log.info("drained: %s", outcome)

    async def warm_up(self) -> None:
        try:
            # A base model without a chat template takes raw prompts only: warm it up with one.
            raw = isinstance(self.engine.chat_format, NoChat)
            parsed = parse_request({**WARMUP_BODY, "raw": True} if raw else WARMUP_BODY)
            generation = await admit(self.admission, _NoClient(), parsed, await self.prompt_ids(parsed),
                                     self.engine.tokenizer)
            try:
                await generation.text()
            finally:
                generation.close()
        except LlmpackError as exc:
            self.not_ready_reason = f"the warm-up generation failed: {exc.message}"
            log.error("%s; /ready stays false", self.not_ready_reason)
            return
        self.ready = True
        log.debug("warm-up generation done; ready")


class _NoClient:
    """The warm-up's stand-in for an HTTP request: a client that never disconnects."""

    async def receive(self) -> dict:
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}


def state_of(request: Request) -> ServerState:
    return request.app.state.llm


# --- Workers AI routes ---------------------------------------------------------------------------


async def run_model(request: Request, model: str) -> Response:
    """Workers AI binding shape: {"response", "usage"}, or the event stream when stream is true."""
    return await _run(request, model, envelope=False)


async def run_model_rest(request: Request, account_id: str, model: str) -> Response:
    """Workers AI REST shape: the answer inside {"result", "success", "errors", "messages"}; streams as is."""
    return await _run(request, model, envelope=True)


async def _run(request: Request, model: str, envelope: bool) -> Response:
    state = state_of(request)
    state.check_model(model)
    parsed, prompt_ids = await state.read_request(request)
    generation = await state.admit(request, parsed, prompt_ids)
    if parsed.stream:
        return EventStreamResponse(generation, _workers_events(generation, request.scope,
                                                               state.settings.stream_padding))
    try:
        text = await generation.text()
    finally:
        generation.close()
    payload = completion_json(text, generation.finished.usage)
    return json_response({"result": payload, "success": True, "errors": [], "messages": []} if envelope else payload)


async def _workers_events(generation: Generation, scope: Scope, padding: bool):
    """Workers AI's exact stream: one event per piece, the usage event, then [DONE]."""
    try:
        async for batch in generation.batches():  # the events of tokens that arrived together: one write
            yield b"".join(sse_event(_padded({"response": piece}) if padding else {"response": piece})
                           for piece in batch)
    except LlmpackError as exc:
        yield error_event(scope, exc)
        return
    usage = generation.finished.usage
    yield sse_event(_padded({"response": "", "usage": usage.as_dict()})) if padding else sse_usage_event(usage)
    yield SSE_DONE


def _padded(payload: dict) -> dict:
    # Random length, so the size of an event no longer tells an observer the length of its token.
    return {**payload, "p": _PADDING[: secrets.randbelow(len(_PADDING) + 1)]}


# --- probes and metrics ----------------------------------------------------------------------------


async def health() -> Response:
    return json_response({"status": "ok"})


async def ready(request: Request) -> Response:
    state = state_of(request)
    halted = state.engine.scheduler.halted
    if state.ready and not halted:
        return json_response({"ready": True, "models": list(state.models)})
    return json_response({"ready": False, "reason": halted or state.not_ready_reason}, status=503)


async def metrics(request: Request) -> Response:
    return PlainTextResponse(state_of(request).metrics.render(), media_type=CONTENT_TYPE)


# --- the app ------------------------------------------------------------------------------------------


def create_app(engine, settings: ServerSettings = ServerSettings()) -> FastAPI:
    """The ASGI app over a loaded engine; the lifespan starts the worker and the warm-up."""
    state = ServerState(engine, settings)
    # fastapi-offline: FastAPI with /docs served from assets in the package (FastAPI's own page loads Swagger
    # UI from a CDN, blank on an appliance with no internet).
    app = FastAPIOffline(
        title="llmpack",
        summary=f"{engine.model_name} behind the Workers AI schema of {MODEL_NAME}, plus OpenAI-compatible routes",
        lifespan=_lifespan,
        redoc_url=None,
        static_url=DOCS_ASSETS,
        favicon_url="data:,",
        middleware=[Middleware(RequestRecord, metrics=state.metrics),
                    Middleware(ApiKeyMiddleware, api_key=settings.api_key)],
    )
    app.state.llm = state
    install_error_handlers(app, settings.retry_after_s)
    _add_workers_routes(app)
    token_routes.add_routes(app, doc.request_body(doc.workers_input_schema()), engine.tokenizer.vocab_size)
    openai_api.add_routes(app)
    doc.document_models(app, state.models, settings.api_key is not None)
    return app


def _add_workers_routes(app: FastAPI) -> None:
    body = doc.request_body(doc.workers_input_schema())
    answer = doc.object_schema({"response": {"type": "string"}, "usage": doc.USAGE})
    envelope = doc.object_schema({"result": answer, "success": {"const": True}, "errors": {"type": "array"},
                                  "messages": {"type": "array"}})
    app.add_api_route("/ai/run/{model:path}", run_model, methods=["POST"], openapi_extra=body,
                      responses={**doc.success_response(answer, streams=True), **doc.error_responses(False)})
    app.add_api_route("/client/v4/accounts/{account_id}/ai/run/{model:path}", run_model_rest, methods=["POST"],
                      openapi_extra=body,
                      responses={**doc.success_response(envelope, streams=True), **doc.error_responses(False)})
    app.add_api_route("/health", health, methods=["GET"],
                      responses=doc.success_response(doc.object_schema({"status": {"const": "ok"}}), streams=False))
    ready_yes = doc.object_schema({"ready": {"const": True}, "models": {"type": "array", "items": {"type": "string"}}})
    ready_no = doc.object_schema({"ready": {"const": False}, "reason": {"type": "string"}})
    app.add_api_route("/ready", ready, methods=["GET"], responses={
        **doc.success_response(ready_yes, streams=False),
        503: {"description": "Not ready yet", "content": {"application/json": {"schema": ready_no}}}})
    app.add_api_route("/metrics", metrics, methods=["GET"], response_class=PlainTextResponse,
                      responses=doc.error_responses(False, (401,)))


@asynccontextmanager
async def _lifespan(app: FastAPI):
    state: ServerState = app.state.llm
    warm_up = asyncio.create_task(state.warm_up()) if state.settings.warmup else None
    if warm_up is None:
        state.ready = True
    yield
    if warm_up is not None:
        warm_up.cancel()
    # Cancels what is still queued or running and waits for the engine to let go of it, off the loop.
    await run_in_threadpool(state.admission.close, state.settings.shutdown_timeout_s)
