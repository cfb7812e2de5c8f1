"""The wire: request JSON -> GenerationRequest at the start of the pipeline, text + usage -> JSON / SSE at its end.

The input rules are the published Workers AI schema of @cf/meta/llama-2-7b-chat-fp16 (loaded from
the packaged copy, checked with jsonschema) plus the service's sampling fields; it knows no model: the rules of
turns (role order, turn tags) are the engine's chat format's (runtime/chat_format.py). Every error names
the field and the rule, because jsonschema's own oneOf message names neither.
"""

from __future__ import annotations

import copy
import json
import math
import re
from importlib import resources

import jsonschema

from llmpack.runtime.errors import InvalidRequest
from llmpack.runtime.request import GenerationRequest, Usage
from llmpack.runtime.sampling import SamplingParams
from llmpack.runtime.template import as_message

SPEC_FILE = "spec_llama-2-7b-chat-fp16.json"
SPEC: dict = json.loads(resources.files("llmpack.runtime.serve").joinpath(SPEC_FILE).read_text(encoding="utf-8"))
MODEL_NAME: str = SPEC["model"]
CONTEXT_LIMIT: int = SPEC["properties"]["context_length_limit"]
INPUT_LIMIT: int = SPEC["properties"]["sequence_length_limit"]

_PROMPT_BRANCH, _MESSAGES_BRANCH = SPEC["input_schema"]["oneOf"]
DEFAULT_MAX_TOKENS: int = _PROMPT_BRANCH["properties"]["max_tokens"]["default"]

# What the engine is told to enforce for this API (EngineOptions fields): 3072 tokens of context, 2500 of input.
ENGINE_LIMITS = {"context_limit": CONTEXT_LIMIT, "input_limit": INPUT_LIMIT}

SSE_DONE = b"data: [DONE]\n\n"

_FLOAT_FIELDS = ("temperature", "top_p", "repetition_penalty", "frequency_penalty", "presence_penalty")
_INT_FIELDS = ("top_k", "seed")


def _branch_validator(branch: dict) -> jsonschema.Draft202012Validator:
    schema = copy.deepcopy(branch)
    schema["type"] = "object"
    # Beyond the published schema: a request for zero or fewer tokens is a client bug.
    schema["properties"]["max_tokens"]["minimum"] = 1
    return jsonschema.Draft202012Validator(schema)


_PROMPT_VALIDATOR = _branch_validator(_PROMPT_BRANCH)
_MESSAGES_VALIDATOR = _branch_validator(_MESSAGES_BRANCH)


def decode_json(raw: bytes | str, what: str = "the request body") -> object:
    """Strict JSON: RFC 8259 text only, so every reader of the body sees the same request.

    Python's json accepts NaN/Infinity, keeps the last of duplicate keys (a proxy that validated the
    first saw another request) and lone surrogates from \\ud800 escapes (text no tokenizer or UTF-8
    encoder can take): all three are refused here, before anything reads the body.
    """
    try:
        decoded = json.loads(raw, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except RecursionError as exc:
        raise InvalidRequest(f"{what} is not valid JSON: it is nested too deeply") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an over-long integer literal, ours
        raise InvalidRequest(f"{what} is not valid JSON: {exc}") from exc
    if _may_hold_surrogates(raw) and _has_lone_surrogate(decoded):
        raise InvalidRequest(f"{what} is not valid JSON: a string holds a lone UTF-16 surrogate (U+D800-U+DFFF), "
                             "which is not a character")
    return decoded


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key!r} appears twice in one object")
        out[key] = value
    return out


def _may_hold_surrogates(raw: bytes | str) -> bool:
    """Cheap pre-check: UTF-8 bytes never decode to a surrogate, only a \\uD800-\\uDFFF escape makes one."""
    escape = r"\\u[dD][89abcdefABCDEF]"
    if isinstance(raw, str):
        # A str from the command line may also carry raw surrogates (surrogateescape of invalid UTF-8).
        return not raw.isascii() or re.search(escape, raw) is not None
    return re.search(escape.encode(), raw) is not None


def _has_lone_surrogate(value: object) -> bool:
    stack = [value]  # iterative: the value may be nested as deeply as json allows
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def parse_request(body: object) -> GenerationRequest:
    """Validate a decoded JSON request body; raise InvalidRequest naming the field and the rule."""
    if not isinstance(body, dict):
        raise InvalidRequest(
            f"the request body must be a JSON object with 'prompt' or 'messages', got {_show(body)}"
        )
    _check_finite(body)
    has_prompt, has_messages = "prompt" in body, "messages" in body
    if has_prompt and has_messages:
        raise InvalidRequest("send either 'prompt' or 'messages', not both")
    if not (has_prompt or has_messages):
        raise InvalidRequest("the request needs 'prompt' (a string) or 'messages' (a list of {role, content})")
    _check_schema(_PROMPT_VALIDATOR if has_prompt else _MESSAGES_VALIDATOR, body)
    raw = body.get("raw", False)
    if not isinstance(raw, bool):
        raise InvalidRequest(f"raw: must be a boolean, got {_show(raw)}")
    if has_messages and raw:
        raise InvalidRequest("raw: applies to 'prompt' only; send the raw text as 'prompt' with raw=true")
    # Shape only: the rules of turns (role order, turn tags) are the model's chat format's, checked by the engine.
    messages = tuple(as_message(m, i) for i, m in enumerate(body["messages"])) if has_messages else None
    return GenerationRequest(
        prompt=body.get("prompt"),
        messages=messages,
        raw=raw,
        stream=body.get("stream", False),
        max_tokens=int(body.get("max_tokens", DEFAULT_MAX_TOKENS)),
        sampling=_sampling(body),
    )


def _check_finite(body: dict) -> None:
    for key, value in body.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidRequest(f"{key}: must be a finite number, got {value!r}")


def _check_schema(validator: jsonschema.Draft202012Validator, body: dict) -> None:
    check_schema(validator, body)


def check_schema(validator: jsonschema.Draft202012Validator, body: dict) -> None:
    """InvalidRequest for the error that comes first in the body (messages[2] before messages[10]), worded
    as every route words it: both API families go through here, so a rule reads the same on each."""
    def position(error: jsonschema.ValidationError) -> list[str]:
        return [f"{p:09d}" if isinstance(p, int) else p for p in error.absolute_path]

    errors = sorted(validator.iter_errors(body), key=lambda e: (position(e), e.validator))
    if errors:
        top = errors[0].absolute_path[0] if errors[0].absolute_path else None
        raise InvalidRequest(_describe(errors[0]), str(top) if top is not None else None)


def _describe(error: jsonschema.ValidationError) -> str:
    """One readable sentence for a jsonschema error: '<field path>: <rule>, got <value>'."""
    where = _path(error.absolute_path)
    if error.validator == "required":
        missing = next(key for key in error.validator_value if key not in error.instance)
        return f"{_path([*error.absolute_path, missing])}: is required"
    if error.validator == "maxLength":
        return f"{where}: is longer than {error.validator_value} characters (got {len(error.instance)})"
    if error.validator in ("minimum", "maximum", "exclusiveMinimum") and "maximum" in error.schema:
        return f"{where}: must be {_range(error.schema)}, got {_show(error.instance)}"
    if error.validator in ("enum", "const"):
        allowed = error.schema.get("enum", [error.schema.get("const")])
        return f"{where}: must be {' or '.join(json.dumps(v) for v in allowed)}, got {_show(error.instance)}"
    if error.validator in ("minItems", "maxItems"):
        bound = "at least" if error.validator == "minItems" else "at most"
        return f"{where}: must hold {bound} {error.validator_value} items, got {len(error.instance)}"
    return f"{where}: must be {_expectation(error.schema)}, got {_show(error.instance)}"


def _range(schema: dict) -> str:
    """The words SamplingParams.validate uses for the same bounds."""
    high = schema["maximum"]
    if "exclusiveMinimum" in schema:
        return f"greater than {schema['exclusiveMinimum']:g} and at most {high:g}"
    if "integer" in _types(schema):
        return f"an integer from {schema.get('minimum')} to {high}"
    return f"between {schema.get('minimum', 0):g} and {high:g}"


def _types(schema: dict) -> list[str]:
    kind = schema.get("type")
    return kind if isinstance(kind, list) else [kind]


def _expectation(schema: dict) -> str:
    kind = next((k for k in _types(schema) if k != "null"), None)
    if kind == "integer":
        return "an integer" + (f" ≥ {schema['minimum']}" if "minimum" in schema else "")
    if kind == "string":
        return "a string" + (f" of at most {schema['maxLength']} characters" if "maxLength" in schema else "")
    if kind == "object" and "role" in schema.get("properties", {}):
        return "an object with string 'role' and 'content'"
    names = {"boolean": "a boolean", "array": "an array", "object": "an object", "number": "a number"}
    return names.get(kind, f"valid under {schema}")


def _path(parts) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "request"


def _show(value: object) -> str:
    """A value as the client wrote it, in JSON terms, shortened."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (list, dict)):
        return "an array" if isinstance(value, list) else "an object"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _sampling(body: dict) -> SamplingParams:
    """Type-check the sampling fields here; their ranges live in SamplingParams.validate."""
    fields = {}
    for name in _FLOAT_FIELDS + _INT_FIELDS:
        if name not in body:
            continue
        value = body[name]
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if name in _INT_FIELDS:
            if not is_number or value != int(value):
                raise InvalidRequest(f"{name}: must be an integer, got {_show(value)}")
            value = int(value)
        elif not is_number:
            raise InvalidRequest(f"{name}: must be a number, got {_show(value)}")
        fields[name] = value
    return SamplingParams(**fields).validate()


def completion_json(text: str, usage: Usage) -> dict:
    """The non-streaming response body."""
    return {"response": text, "usage": usage.as_dict()}


# One encoder for every event: json.dumps with options builds a new one per call (~10 us a token).
_EVENT_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sse_event(payload: dict) -> bytes:
    """One server-sent event; JSON escapes newlines, so the payload always stays on one data line."""
    return b"data: " + _EVENT_JSON.encode(payload).encode("utf-8") + b"\n\n"


def sse_usage_event(usage: Usage) -> bytes:
    """The last event before SSE_DONE: no text, only the token counts."""
    return sse_event({"response": "", "usage": usage.as_dict()})
