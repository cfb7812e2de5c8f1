"""Serve wing: /tokenize and /detokenize — the ids the model is fed for a body, and the text of given ids.

Both use the engine's own tokenizer and template, so what /tokenize returns is exactly what a request
with the same body would feed the model (the same rules, the same input limit).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from starlette.responses import Response

from llmpack.runtime.errors import InvalidRequest
from llmpack.runtime.serve import openapi_doc as doc
from llmpack.runtime.serve.http_edge import json_response
from llmpack.runtime.serve.protocol import parse_request

MAX_DETOKENIZE_IDS = 16384  # far above any context; bounds the work one request can ask for


async def tokenize(request: Request) -> Response:
    """The ids the model would be fed for this body, as `llm-serve tokenize` prints them."""
    state = request.app.state.llm
    ids = await state.prompt_ids(parse_request(await state.body(request)))
    return json_response({"tokens": ids, "count": len(ids)})


async def detokenize(request: Request) -> Response:
    """{"tokens": [ids]} → {"text"}: the text those ids decode to (control tokens such as <s> give none)."""
    state = request.app.state.llm
    ids = check_token_ids(await state.body(request), state.engine.tokenizer.vocab_size)
    return json_response({"text": state.engine.tokenizer.decode(ids), "count": len(ids)})


def check_token_ids(body: object, vocab_size: int) -> list[int]:
    """The body's `tokens`, each an id of the vocabulary; InvalidRequest naming what is wrong otherwise."""
    if not isinstance(body, dict) or "tokens" not in body:
        raise InvalidRequest('the body must be a JSON object with "tokens": a list of token ids', "tokens")
    unknown = sorted(set(body) - {"tokens"})
    if unknown:
        raise InvalidRequest(f"{unknown[0]}: not a field of /detokenize (it takes only \"tokens\")", unknown[0])
    ids = body["tokens"]
    if not isinstance(ids, list) or len(ids) > MAX_DETOKENIZE_IDS:
        raise InvalidRequest(f"tokens: must be a list of at most {MAX_DETOKENIZE_IDS} token ids", "tokens")
    out = []
    for index, token in enumerate(ids):
        # JSON has one number type: 254.0 is the integer 254 (as for every integer field of the API).
        whole = isinstance(token, int) or (isinstance(token, float) and token.is_integer())
        if isinstance(token, bool) or not whole or not 0 <= token < vocab_size:
            raise InvalidRequest(f"tokens[{index}]: {token!r} is not a token id of this model "
                                 f"(integers 0..{vocab_size - 1})", "tokens")
        out.append(int(token))
    return out


def detokenize_schema(vocab_size: int | None = None) -> dict:
    item = {"type": "integer", "minimum": 0, **({"maximum": vocab_size - 1} if vocab_size else {})}
    return {"type": "object", "required": ["tokens"], "additionalProperties": False,
            "properties": {"tokens": {"type": "array", "items": item, "maxItems": MAX_DETOKENIZE_IDS}}}


def add_routes(app: FastAPI, workers_body: dict, vocab_size: int) -> None:
    tokens = doc.object_schema({"tokens": {"type": "array", "items": {"type": "integer"}},
                                "count": {"type": "integer"}})
    app.add_api_route("/tokenize", tokenize, methods=["POST"], openapi_extra=workers_body,
                      responses={**doc.success_response(tokens, streams=False),
                                 **doc.error_responses(False, (400, 401, 408, 413, 415))})
    text = doc.object_schema({"text": {"type": "string"}, "count": {"type": "integer"}})
    app.add_api_route("/detokenize", detokenize, methods=["POST"],
                      openapi_extra=doc.request_body(detokenize_schema(vocab_size)),
                      responses={**doc.success_response(text, streams=False),
                                 **doc.error_responses(False, (400, 401, 408, 413, 415))})
