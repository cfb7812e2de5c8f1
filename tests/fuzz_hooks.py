"""Schemathesis hooks for the API fuzz runs (tests/test_hostile_api.py, `make fuzz`): checks of our own.

Loaded by `st run` through SCHEMATHESIS_HOOKS=fuzz_hooks (tests/ on PYTHONPATH). Schemathesis's
built-in checks see status codes and JSON bodies; these add what they cannot: no traceback or
internal detail in any body, and an event stream that is well framed to its end.

The positive-data acceptance check (a schema-valid body must not get a 4xx) holds for every rule JSON
Schema can state — the document declares those. Three rules it cannot state are the only 400s let through
(`filter_failure`): the input limit counted in tokens (3030: "prompt is N tokens, the limit is M"), the
chat template's turn rules (role order, a turn-tag in content), and logit_bias ids past the loaded model's
vocabulary (they are the keys of an object: JSON Schema bounds a key's pattern, not its number);
tests/test_hostile_api.py, tests/test_template.py and tests/test_openai_compat.py check those 400s by hand.
"""

from __future__ import annotations

import json

import schemathesis

from llmpack.runtime.template import ORDER_RULE

# What a leaked traceback or a framework's debug page looks like.
LEAKS = ("Traceback (most recent call last)", 'File "/', "Internal Server Error", "<html")


@schemathesis.check
def no_internal_details(ctx, response, case):
    """No body ever shows a traceback, a source path or an HTML error page."""
    text = response.content.decode("utf-8", "replace")
    leaked = [marker for marker in LEAKS if marker in text]
    if leaked:
        raise AssertionError(f"the body leaks {leaked[0]!r}: {text[:300]!r}")


@schemathesis.check
def event_streams_are_well_framed(ctx, response, case):
    """A 200 event stream: `data: {json}` events, ending with [DONE] or the route's error event."""
    content_type = (response.headers.get("content-type") or [""])[0]
    if response.status_code != 200 or not content_type.startswith("text/event-stream"):
        return None
    if response.stream_cut_short:
        return None  # schemathesis stopped reading: the end of the stream is not there to check
    raw = response.content
    if not raw.endswith(b"\n\n"):
        raise AssertionError(f"the event stream is cut: it ends with {raw[-80:]!r}")
    *events, last = raw[:-2].split(b"\n\n")
    if last != b"data: [DONE]":
        events.append(last)
    payloads = []
    for block in events:
        if not block.startswith(b"data: ") or b"\n" in block:
            raise AssertionError(f"a malformed event: {block[:120]!r}")
        payloads.append(json.loads(block[len(b"data: "):]))
    if last != b"data: [DONE]" and not ("error" in payloads[-1] or payloads[-1].get("success") is False):
        raise AssertionError(f"the stream ends with neither [DONE] nor an error event: {last[:120]!r}")
    return None


# The template's turn rules, as its messages word them (runtime/template.py), and the vocabulary bound of
# logit_bias keys (runtime/serve/openai_api.py).
TURN_RULES = (ORDER_RULE, "has only a system message", "the last message must come from 'user'",
              "which would inject into the Llama-2 turn structure", "is not in this model's vocabulary")


@schemathesis.hook
def filter_failure(context, failure, case, response) -> bool:
    """Keep every failure but a schema-valid body refused for a rule JSON Schema cannot state."""
    if response.status_code != 400 or "Schema-valid request rejected" not in str(getattr(failure, "title", "")):
        return True
    try:
        body = json.loads(response.content)
    except ValueError:
        return True
    error = body.get("error") or (body.get("errors") or [{}])[0]
    code, message = str(error.get("code")), str(error.get("message", ""))
    return not (code == "3030" or any(rule in message for rule in TURN_RULES))
