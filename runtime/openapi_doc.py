"""Serving, documentation side: the JSON schemas of what each route accepts, for the OpenAPI document.

The Workers AI body is the published schema (protocol.SPEC) plus the sampling fields; the OpenAI
bodies are validated against the very schemas documented here, so the document cannot drift from
what the routes accept.
"""

from __future__ import annotations

import copy
import dataclasses

from llmpack.runtime.protocol import SPEC
from llmpack.runtime.sampling import SEED_MAX, SEED_MIN, SamplingParams

_DEFAULTS = {field.name: field.default for field in dataclasses.fields(SamplingParams)}


def _number(low: float, high: float, name: str, exclusive_low: bool = False) -> dict:
    schema = {"type": "number", "exclusiveMinimum" if exclusive_low else "minimum": low, "maximum": high}
    if _DEFAULTS.get(name) is not None:
        schema["default"] = _DEFAULTS[name]
    return schema


# The ranges SamplingParams.validate enforces (tests/test_server.py checks each bound against the server).
SAMPLING_PROPERTIES: dict[str, dict] = {
    "temperature": _number(0, 5, "temperature"),
    "top_p": _number(0, 2, "top_p"),
    "top_k": {"type": "integer", "minimum": 1, "maximum": 50},
    "repetition_penalty": _number(0, 2, "repetition_penalty", exclusive_low=True),
    "frequency_penalty": _number(0, 2, "frequency_penalty"),
    "presence_penalty": _number(0, 2, "presence_penalty"),
    "seed": {"type": "integer", "minimum": SEED_MIN, "maximum": SEED_MAX},
}


def workers_input_schema() -> dict:
    """The published input schema of the model, plus the sampling fields and max_tokens ≥ 1."""
    schema = copy.deepcopy(SPEC["input_schema"])
    for branch in schema["oneOf"]:
        branch["properties"].update(copy.deepcopy(SAMPLING_PROPERTIES))
        branch["properties"]["max_tokens"]["minimum"] = 1
    return schema


def _nullable(schema: dict) -> dict:
    """OpenAI clients may send null for any optional field; null means "not given"."""
    kind = schema["type"]
    return {**schema, "type": [*(kind if isinstance(kind, list) else [kind]), "null"]}


_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
_MAX_TOKENS = {"type": "integer", "minimum": 1}
_COMMON_OPENAI = {
    "model": {"type": "string"},
    "max_tokens": _nullable(_MAX_TOKENS),
    **{name: _nullable(schema) for name, schema in SAMPLING_PROPERTIES.items()},
    "stop": {"type": ["string", "array", "null"], "items": {"type": "string"}, "maxItems": 4},
    "stream": _nullable({"type": "boolean"}),
    "stream_options": _nullable({"type": "object", "properties": {"include_usage": {"type": "boolean"}}}),
    "n": {"type": ["integer", "null"], "minimum": 1, "maximum": 1},  # one choice per request
}

CHAT_REQUEST_SCHEMA = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        **_COMMON_OPENAI,
        "max_completion_tokens": _nullable(_MAX_TOKENS),
        "messages": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "required": ["role", "content"],
            "properties": {
                "role": {"enum": ["system", "developer", "user", "assistant"]},
                "content": {"anyOf": [{"type": "string", "maxLength": 4096},
                                      {"type": "array", "items": _TEXT_PART}]},
            },
        }},
    },
}

COMPLETION_REQUEST_SCHEMA = {
    "type": "object",
    "required": ["model", "prompt"],
    "properties": {
        **_COMMON_OPENAI,
        "prompt": {"anyOf": [{"type": "string", "maxLength": 4096},
                             {"type": "array", "items": {"type": "string", "maxLength": 4096},
                              "minItems": 1, "maxItems": 1}]},
    },
}

_ERROR_ENVELOPE = {"type": "object", "properties": {
    "result": {"type": "object"}, "success": {"const": False}, "messages": {"type": "array"},
    "errors": {"type": "array", "items": {"type": "object", "properties": {
        "code": {"type": "integer"}, "message": {"type": "string"}}}}}}
_OPENAI_ERROR = {"type": "object", "properties": {"error": {"type": "object", "properties": {
    "message": {"type": "string"}, "type": {"type": "string"}, "code": {"type": ["string", "null"]}}}}}
_ERROR_STATUSES = {400: "Invalid body (the message names the field and the rule)", 401: "Missing or wrong API key",
                   404: "Unknown model", 413: "Body over the size limit", 415: "Not a JSON body",
                   429: "Queue full; see Retry-After", 500: "The generation failed"}


def request_body(schema: dict) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def error_responses(openai: bool, statuses=tuple(_ERROR_STATUSES)) -> dict:
    schema = _OPENAI_ERROR if openai else _ERROR_ENVELOPE
    content = {"content": {"application/json": {"schema": schema}}}
    # "4XX" also keeps FastAPI from documenting a 422 the server never sends (its errors are 400s).
    return {**{status: {"description": _ERROR_STATUSES[status], **content} for status in statuses},
            "4XX": {"description": "Any other client error, e.g. 405 for a wrong method", **content}}


def success_response(schema: dict, streams: bool) -> dict:
    content = {"application/json": {"schema": schema}}
    if streams:
        content["text/event-stream"] = {"schema": {"type": "string", "description": "data: {json} events, "
                                                   "last `data: [DONE]`"}}
    return {200: {"description": "The answer", "content": content}}
