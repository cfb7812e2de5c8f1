"""Serve wing (OpenAI side): /v1/chat/completions, /v1/completions and /v1/models over the same engine.

An OpenAI body is checked against the schema the OpenAPI document shows, mapped onto a Workers AI
body and validated by protocol.parse_request like any other request, so both APIs share one set of
rules. `stop` strings are cut here: the engine knows only stop ids.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time

import jsonschema
from fastapi import FastAPI, Request
from starlette.responses import Response
from starlette.types import Scope

from llmpack.runtime.errors import InvalidRequest, LlmpackError
from llmpack.runtime.request import GenerationRequest, Usage
from llmpack.runtime.sampling import TokenLogprobs
from llmpack.runtime.serve import openapi_doc as doc
from llmpack.runtime.serve.http_edge import json_response
from llmpack.runtime.serve.openai_logprobs import LogprobsFormat, requested_top
from llmpack.runtime.serve.protocol import SSE_DONE, check_schema, parse_request, sse_event
from llmpack.runtime.serve.streaming import EventStreamResponse, Finished, Generation, StopFilter, error_event

_SAMPLING = tuple(doc.SAMPLING_PROPERTIES)
_CHAT_VALIDATOR = jsonschema.Draft202012Validator(doc.CHAT_REQUEST_SCHEMA)
_COMPLETION_VALIDATOR = jsonschema.Draft202012Validator(doc.COMPLETION_REQUEST_SCHEMA)


def check_body(body: object, chat: bool) -> dict:
    """Raise InvalidRequest naming the field and the rule the body breaks."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    refuse_unsupported(body)
    top = body.get("top_logprobs")
    asks_top = isinstance(top, (int, float)) and not isinstance(top, bool) and top >= 1
    if chat and asks_top and body.get("logprobs") is not True:
        # The schema's if/then says the same; this says it in words.
        raise InvalidRequest("top_logprobs: needs \"logprobs\": true", "top_logprobs")
    check_schema(_CHAT_VALIDATOR if chat else _COMPLETION_VALIDATOR, body)
    return body


def refuse_unsupported(body: dict) -> None:
    """A 400 naming the first field that asks for what this server does not do (the schema says the same)."""
    for name, (neutral, what) in doc.UNSUPPORTED_OPENAI.items():
        # Compared as JSON: false and 0 are different answers to ask for, though Python finds them equal.
        if name in body and json.dumps(body[name]) not in map(json.dumps, neutral):
            raise InvalidRequest(f"{name}: {what} is not supported by this server; remove the field "
                                 f"(or send {json.dumps(neutral[-1])})", name)
    if body.get("n") not in (None, 1):
        raise InvalidRequest("n: one choice per request is supported; send n=1, or several requests", "n")



def to_workers_body(body: dict, chat: bool) -> dict:
    """The Workers AI body that asks the engine for what this OpenAI body asks for."""
    out = {name: body[name] for name in _SAMPLING if body.get(name) is not None}
    max_tokens = body.get("max_completion_tokens") if chat else None
    max_tokens = body.get("max_tokens") if max_tokens is None else max_tokens
    if max_tokens is not None:
        out["max_tokens"] = max_tokens
    if body.get("stream") is not None:
        out["stream"] = body["stream"]
    if chat:
        out["messages"] = [{"role": "system" if m["role"] == "developer" else m["role"], "content": _text(m["content"])}
                           for m in body["messages"]]
    else:
        # A completion continues the text as given: no chat template around it.
        prompt = body["prompt"]
        out["prompt"], out["raw"] = (prompt if isinstance(prompt, str) else prompt[0]), True
    return out


def with_openai_sampling(parsed: GenerationRequest, body: dict, chat: bool, vocab_size: int) -> GenerationRequest:
    """The request with what only OpenAI bodies ask of the sampler: logit_bias and log probabilities."""
    pairs = _logit_bias(body.get("logit_bias"), vocab_size)
    top = requested_top(body, chat)
    if not pairs and top is None:
        return parsed
    sampling = dataclasses.replace(parsed.sampling, logit_bias=pairs, top_logprobs=top).validate()
    return dataclasses.replace(parsed, sampling=sampling)


def _logit_bias(bias: dict | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} as sorted pairs (the schema checked the shapes); ids past the vocabulary refused."""
    if not bias:
        return ()
    pairs = tuple(sorted((int(token), float(value)) for token, value in bias.items()))
    outside = [token for token, _ in pairs if token >= vocab_size]
    if outside:
        raise InvalidRequest(f"logit_bias: token id {outside[0]} is not in this model's vocabulary "
                             f"(0..{vocab_size - 1})", "logit_bias")
    return pairs


def _text(content: str | list) -> str:
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


class Reply:
    """Builds the response objects of one chat or text completion (same id across its chunks)."""

    def __init__(self, chat: bool, model: str):
        self.chat = chat
        self.model = model
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    def _object(self, kind: str, choices: list) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def full(self, text: str, finish: str, usage: Usage, logprobs: dict | None = None) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self._object(kind, [{**choice, "logprobs": logprobs, "finish_reason": finish}]),
                "usage": usage.as_dict()}

    def chunk(self, text: str | None = None, finish: str | None = None, role: bool = False,
              logprobs: dict | None = None) -> dict:
        if self.chat:
            delta = {"role": "assistant"} if role else {}
            choice = {"index": 0, "delta": delta if text is None else {**delta, "content": text}}
        else:
            choice = {"index": 0, "text": text or ""}
        return self._object(self._chunk_kind, [{**choice, "logprobs": logprobs, "finish_reason": finish}])

    def usage_chunk(self, usage: Usage) -> dict:
        return {**self._object(self._chunk_kind, []), "usage": usage.as_dict()}

    @property
    def _chunk_kind(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"


def _finish(stops: StopFilter, finished: Finished) -> str:
    return "stop" if stops.stopped else finished.finish_reason


async def chat_completions(request: Request) -> Response:
    return await _complete(request, chat=True)


async def completions(request: Request) -> Response:
    return await _complete(request, chat=False)


async def _complete(request: Request, chat: bool) -> Response:
    state = request.app.state.llm
    body = check_body(await state.body(request), chat)
    state.check_model(body["model"])
    parsed = with_openai_sampling(parse_request(to_workers_body(body, chat)), body, chat,
                                  state.engine.tokenizer.vocab_size)
    prompt_ids = await state.prompt_ids(parsed)
    stop = body.get("stop")
    stops = StopFilter([stop] if isinstance(stop, str) else stop or ())
    generation = await state.admit(request, parsed, prompt_ids)
    reply = Reply(chat, body["model"])
    logprobs = LogprobsFormat(state.engine.tokenizer, chat) if generation.with_logprobs else None
    if parsed.stream:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return EventStreamResponse(generation, _events(generation, reply, stops, include_usage, request.scope,
                                                       logprobs))
    try:
        text, token_logprobs = await _collect(generation, stops)
    finally:
        generation.close()
    rendered = logprobs.render(token_logprobs) if logprobs else None
    return json_response(reply.full(text, _finish(stops, generation.finished), generation.finished.usage, rendered))


async def _collect(generation: Generation, stops: StopFilter) -> tuple[str, list[TokenLogprobs]]:
    """The answer's text, cut at a stop string, and the log probabilities of the tokens up to the cut."""
    parts, token_logprobs = [], []
    async for piece in generation.pieces():
        if not stops.stopped:
            token_logprobs += generation.piece_logprobs()
        parts.append(stops.feed(piece))
        if stops.stopped:
            generation.stop()  # keep reading: the usage comes with the last event
    return "".join(parts) + stops.flush(), token_logprobs


async def _events(generation: Generation, reply: Reply, stops: StopFilter, include_usage: bool, scope: Scope,
                  logprobs: LogprobsFormat | None = None):
    """OpenAI's stream: a role chunk (chat), text chunks, a finish chunk, [usage chunk], [DONE]. A chunk's
    log probabilities are those of the tokens since the last chunk (text a stop string holds back waits)."""
    carried: list[TokenLogprobs] = []

    def chunk(text: str) -> bytes:
        nonlocal carried
        rendered = logprobs.render(carried) if logprobs else None
        carried = []
        return sse_event(reply.chunk(text, logprobs=rendered))

    try:
        if reply.chat:
            yield sse_event(reply.chunk("", role=True))
        async for piece in generation.pieces():
            if not stops.stopped:
                carried += generation.piece_logprobs()
            text = stops.feed(piece)
            if text:
                yield chunk(text)
            if stops.stopped:
                generation.stop()
    except LlmpackError as exc:
        yield error_event(scope, exc)
        return
    tail = stops.flush()
    if tail or carried:
        yield chunk(tail)
    yield sse_event(reply.chunk(finish=_finish(stops, generation.finished)))
    if include_usage:
        yield sse_event(reply.usage_chunk(generation.finished.usage))
    yield SSE_DONE


def _model_object(state, name: str) -> dict:
    return {"id": name, "object": "model", "created": state.started_at, "owned_by": "llmpack"}


async def list_models(request: Request) -> Response:
    state = request.app.state.llm
    return json_response({"object": "list", "data": [_model_object(state, name) for name in state.models]})


async def get_model(request: Request, model: str) -> Response:
    """One model by id (ids may hold slashes, as the Workers id does); 404 for a model this server does not run."""
    state = request.app.state.llm
    state.check_model(model)
    return json_response(_model_object(state, model))


def add_routes(app: FastAPI) -> None:
    errors = doc.error_responses(openai=True)
    chat = doc.object_schema({"id": {"type": "string"}, "object": {"enum": ["chat.completion", "text_completion"]},
                              "created": {"type": "integer"}, "model": {"type": "string"},
                              "choices": {"type": "array", "minItems": 1, "maxItems": 1}, "usage": doc.USAGE})
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"],
                      openapi_extra=doc.request_body(doc.CHAT_REQUEST_SCHEMA),
                      responses={**doc.success_response(chat, streams=True), **errors})
    app.add_api_route("/v1/completions", completions, methods=["POST"],
                      openapi_extra=doc.request_body(doc.COMPLETION_REQUEST_SCHEMA),
                      responses={**doc.success_response(chat, streams=True), **errors})
    model = doc.object_schema({"id": {"type": "string"}, "object": {"const": "model"}})
    models = doc.object_schema({"object": {"const": "list"}, "data": {"type": "array", "items": model}})
    app.add_api_route("/v1/models", list_models, methods=["GET"],
                      responses={**doc.success_response(models, streams=False), **doc.error_responses(True, (401,))})
    app.add_api_route("/v1/models/{model:path}", get_model, methods=["GET"],
                      responses={**doc.success_response(model, streams=False),
                                 **doc.error_responses(True, (401, 404))})
