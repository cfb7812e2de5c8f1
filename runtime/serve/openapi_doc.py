"""Serving, documentation side: the JSON schemas of what each route accepts, for the OpenAPI document.

The Workers AI body is the published schema (protocol.SPEC) plus the sampling fields; the OpenAI
bodies are validated against the very schemas documented here, so the document cannot drift from
what the routes accept.
"""

from __future__ import annotations

import copy
import dataclasses

from llmpack.runtime.sampling import LOGIT_BIAS_ENTRIES, LOGIT_BIAS_MAX, SEED_MAX, SEED_MIN, SamplingParams
from llmpack.runtime.serve.http_edge import OPEN_PATHS
from llmpack.runtime.serve.openai_logprobs import CHAT_RULE as LOGPROBS_RULE
from llmpack.runtime.serve.openai_logprobs import CHAT_SCHEMA as LOGPROBS_CHAT
from llmpack.runtime.serve.openai_logprobs import COMPLETION_SCHEMA as LOGPROBS_COMPLETION
from llmpack.runtime.serve.protocol import SPEC
from llmpack.runtime.template import ROLES

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
    """The published input schema of the model, plus the sampling fields, max_tokens ≥ 1 and messages ≥ 1."""
    schema = copy.deepcopy(SPEC["input_schema"])
    for branch in schema["oneOf"]:
        branch["properties"].update(copy.deepcopy(SAMPLING_PROPERTIES))
        branch["properties"]["max_tokens"]["minimum"] = 1
    # The template needs a user message: an empty conversation is a 400, so the document says so too; and
    # it knows three roles (the published schema says only "string").
    messages = schema["oneOf"][1]["properties"]["messages"]
    messages["minItems"] = 1
    # One or the other, never both (a body with both would still match one branch of the published oneOf).
    schema["oneOf"][0]["not"], schema["oneOf"][1]["not"] = {"required": ["messages"]}, {"required": ["prompt"]}
    messages["items"]["properties"]["role"]["enum"] = list(ROLES)
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
    # {"token id": bias}: added to that token's logit before sampling (ids past the vocabulary are a 400 too)
    "logit_bias": {"type": ["object", "null"], "maxProperties": LOGIT_BIAS_ENTRIES,
                   "propertyNames": {"pattern": "^[0-9]{1,9}$"},
                   "additionalProperties": {"type": "number", "minimum": -LOGIT_BIAS_MAX, "maximum": LOGIT_BIAS_MAX}},
}

# OpenAI fields that would change the answer and that the server does not do: each is accepted only with a
# value that leaves the answer as if it were absent (null, false, an empty list…), and refused by name
# otherwise (openai_api.refuse_unsupported) rather than ignored. field → (those values, what it asks for).
UNSUPPORTED_OPENAI: dict[str, tuple[list, str]] = {
    "tools": ([None, []], "tool calling"),
    "tool_choice": ([None, "none", "auto"], "tool calling"),
    "functions": ([None, []], "function calling"),
    "function_call": ([None, "none", "auto"], "function calling"),
    "response_format": ([None, {"type": "text"}], "structured output"),
    "best_of": ([None, 1], "best-of sampling"),
    "echo": ([None, False], "echoing the prompt"),
    "suffix": ([None, ""], "insertion (suffix)"),
    "audio": ([None], "audio output"),
    "modalities": ([None, ["text"]], "other output modalities"),
    "prediction": ([None], "predicted outputs"),
    "web_search_options": ([None], "web search"),
}
_COMMON_OPENAI.update({name: {"enum": values} for name, (values, _) in UNSUPPORTED_OPENAI.items()})

CHAT_REQUEST_SCHEMA = {
    "type": "object",
    "required": ["model", "messages"],
    **LOGPROBS_RULE,
    "properties": {
        **_COMMON_OPENAI,
        **LOGPROBS_CHAT,
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
        **LOGPROBS_COMPLETION,
        "prompt": {"anyOf": [{"type": "string", "maxLength": 4096},
                             {"type": "array", "items": {"type": "string", "maxLength": 4096},
                              "minItems": 1, "maxItems": 1}]},
    },
}

def object_schema(properties: dict) -> dict:
    """An object that has all these properties (response documents: what a client may rely on)."""
    return {"type": "object", "required": list(properties), "properties": properties}


_COUNT = {"type": "integer", "minimum": 0}
USAGE = object_schema({"prompt_tokens": _COUNT, "completion_tokens": _COUNT, "total_tokens": _COUNT})
_ERROR_ENVELOPE = object_schema({
    "result": {"type": "object"}, "success": {"const": False}, "messages": {"type": "array"},
    "errors": {"type": "array", "minItems": 1,
               "items": object_schema({"code": {"type": "integer"}, "message": {"type": "string"}})}})
_OPENAI_ERROR = object_schema({"error": object_schema(
    {"message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
     "code": {"type": ["string", "null"]}})})
_ERROR_STATUSES = {400: "Invalid body (the message names the field and the rule)", 401: "Missing or wrong API key",
                   404: "Unknown model", 408: "Body not received within the body timeout",
                   413: "Body over the size limit", 415: "Not a JSON body",
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
        # OpenAPI 3.1 reads the schema of an event stream as the schema of each event.
        event = {"type": "object", "required": ["data"], "properties": {"data": {
            "type": "string", "description": "one JSON object per event, then `[DONE]`; a stream that fails "
                                             "midway ends with the route's JSON error instead"}}}
        content["text/event-stream"] = {"schema": event}
    return {200: {"description": "The answer", "content": content}}


def document_models(app, models: tuple[str, ...], keyed: bool) -> None:
    """Name the served models in the OpenAPI document: `model` in a path or an OpenAI body is one of them.

    Known only once the artifact is loaded, so patched into the generated document; the OpenAI
    validators keep accepting any string (an unknown model is a 404, as OpenAI answers it).
    """
    generate = app.openapi

    def openapi() -> dict:
        spec = generate()
        if keyed:  # the page's Authorize button: a bearer key for every operation but the open ones
            spec.setdefault("components", {})["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
            for path, item in spec["paths"].items():
                for operation in item.values():
                    operation["security"] = [] if path in OPEN_PATHS else [{"apiKey": []}]
        for operation in (op for item in spec["paths"].values() for op in item.values()):
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "model" and parameter["in"] == "path":
                    parameter["schema"] = {"type": "string", "enum": list(models)}
            # A copy: the document must never alias the schemas the OpenAI validators hold.
            content = copy.deepcopy(operation.get("requestBody", {}).get("content", {}))
            body = content.get("application/json", {}).get("schema", {})
            if "model" in body.get("properties", {}):
                body["properties"]["model"] = {"type": "string", "enum": list(models)}
                operation["requestBody"]["content"] = content
        return spec

    app.openapi = openapi
