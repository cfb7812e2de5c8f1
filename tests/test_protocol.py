"""Protocol: the published input schema (+ sampling fields) with readable errors, and the output wire format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmpack.runtime.chat_format import Llama2Chat
from llmpack.runtime.errors import InputTooLong, InvalidRequest
from llmpack.runtime.request import check_prompt_length
from llmpack.runtime.sampling import SamplingParams
from llmpack.runtime.serve import protocol
from llmpack.runtime.serve.protocol import (
    CONTEXT_LIMIT,
    INPUT_LIMIT,
    SSE_DONE,
    GenerationRequest,
    Usage,
    completion_json,
    parse_request,
    sse_event,
    sse_usage_event,
)
from llmpack.runtime.template import Message

SPEC_COPY = Path(__file__).resolve().parents[1] / "runtime" / "serve" / "spec_llama-2-7b-chat-fp16.json"


def test_limits_come_from_the_spec():
    assert (CONTEXT_LIMIT, INPUT_LIMIT) == (3072, 2500)
    assert protocol.DEFAULT_MAX_TOKENS == 256
    assert protocol.SPEC == json.loads(SPEC_COPY.read_text(encoding="utf-8"))


def test_spec_copy_matches_shared(shared_dir):
    assert json.loads((shared_dir / "spec" / "llama-2-7b-chat-fp16.json").read_text()) == protocol.SPEC


def test_prompt_request_defaults():
    request = parse_request({"prompt": "Hello"})
    assert request == GenerationRequest(
        prompt="Hello", messages=None, raw=False, stream=False, max_tokens=256, sampling=SamplingParams()
    )


def test_messages_request_and_sampling_fields():
    body = {
        "messages": [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"}],
        "stream": True,
        "max_tokens": 16,
        "temperature": 0,
        "top_k": 5,
        "top_p": 0.5,
        "repetition_penalty": 1.1,
        "frequency_penalty": 0.2,
        "presence_penalty": 0.3,
        "seed": 42,
    }
    request = parse_request(body)
    assert request.messages == (Message("system", "Be brief"), Message("user", "Hi"))
    assert (request.prompt, request.raw, request.stream, request.max_tokens) == (None, False, True, 16)
    assert request.sampling == SamplingParams(0, 5, 0.5, 1.1, 0.2, 0.3, 42)


def test_integral_floats_become_ints():
    request = parse_request({"prompt": "x", "max_tokens": 12.0, "top_k": 3.0, "seed": 7.0})
    assert (request.max_tokens, request.sampling.top_k, request.sampling.seed) == (12, 3, 7)
    assert type(request.max_tokens) is int and type(request.sampling.seed) is int


def test_raw_prompt_may_carry_tags():
    request = parse_request({"prompt": "[INST] <<SYS>>x<</SYS>> hi [/INST]", "raw": True})
    assert request.raw is True


def chat(*roles: str) -> list[dict]:
    return [{"role": role, "content": f"text {i}"} for i, role in enumerate(roles)]


def error_of(body: object) -> str:
    with pytest.raises(InvalidRequest) as info:
        parse_request(body)
    return str(info.value)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (["prompt"], "the request body must be a JSON object with 'prompt' or 'messages', got an array"),
        ("hi", "the request body must be a JSON object with 'prompt' or 'messages', got 'hi'"),
        ({"prompt": "a", "messages": []}, "send either 'prompt' or 'messages', not both"),
        ({"stream": True}, "the request needs 'prompt' (a string) or 'messages' (a list of {role, content})"),
        ({"prompt": 5}, "prompt: must be a string of at most 4096 characters, got 5"),
        ({"prompt": None}, "prompt: must be a string of at most 4096 characters, got null"),
        ({"prompt": "x" * 4097}, "prompt: is longer than 4096 characters (got 4097)"),
        ({"messages": "hi"}, "messages: must be an array, got 'hi'"),
        ({"messages": ["hi"]}, "messages[0]: must be an object with string 'role' and 'content', got 'hi'"),
        ({"messages": [{"role": "user"}]}, "messages[0].content: is required"),
        ({"messages": [{"content": "x"}]}, "messages[0].role: is required"),
        ({"messages": [{"role": 1, "content": "x"}]}, "messages[0].role: must be a string, got 1"),
        ({"prompt": "x", "max_tokens": "abc"}, "max_tokens: must be an integer ≥ 1, got 'abc'"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens: must be an integer ≥ 1, got 0"),
        ({"prompt": "x", "max_tokens": 2.5}, "max_tokens: must be an integer ≥ 1, got 2.5"),
        ({"prompt": "x", "max_tokens": True}, "max_tokens: must be an integer ≥ 1, got true"),
        ({"prompt": "x", "stream": "yes"}, "stream: must be a boolean, got 'yes'"),
        ({"prompt": "x", "raw": 1}, "raw: must be a boolean, got 1"),
        ({"messages": [{"role": "user", "content": "x"}], "raw": "no"}, "raw: must be a boolean, got 'no'"),
        ({"prompt": "x", "temperature": float("nan")}, "temperature: must be a finite number, got nan"),
        ({"prompt": "x", "top_p": float("inf")}, "top_p: must be a finite number, got inf"),
        ({"prompt": "x", "temperature": True}, "temperature: must be a number, got true"),
        ({"prompt": "x", "temperature": "0.5"}, "temperature: must be a number, got '0.5'"),
        ({"prompt": "x", "top_k": 2.5}, "top_k: must be an integer, got 2.5"),
        ({"prompt": "x", "seed": False}, "seed: must be an integer, got false"),
    ],
)
def test_error_messages_name_field_and_rule(body, expected):
    assert error_of(body) == expected


def test_first_error_in_body_order_wins():
    messages = [{"role": "user", "content": "ok"}] * 12
    messages[10] = {"role": "user", "content": "x" * 5000}
    messages[2] = {"role": "user", "content": 3}
    assert error_of({"messages": messages}).startswith("messages[2].content: must be a string")


def test_max_length_names_the_message_index():
    messages = chat("user", "assistant", "user")
    messages[1]["content"] = "y" * 4097
    assert error_of({"messages": messages}) == "messages[1].content: is longer than 4096 characters (got 4097)"
    messages[1]["content"] = "é" * 4096  # characters, not bytes
    assert parse_request({"messages": messages}).messages[1].content == "é" * 4096


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", 5.5), ("top_k", 51), ("top_p", -0.1), ("repetition_penalty", 0), ("frequency_penalty", 2.5),
     ("presence_penalty", -1), ("seed", 0)],
)
def test_sampling_ranges(field, value):
    assert error_of({"prompt": "x", field: value}).startswith(f"{field}: must be")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"messages": []}, "messages: is empty"),
        ({"messages": chat("user", "user")}, "messages[1].role: two 'user'"),
        ({"messages": chat("bot")}, "messages[0].role: unknown role 'bot'"),
        ({"messages": chat("user", "assistant")}, "messages[1].role: the last"),
        ({"messages": chat("user", "system")}, "messages[1].role: a system"),
        ({"messages": [{"role": "user", "content": "a [/INST] b"}]}, "messages[0].content: contains '[/INST]'"),
        ({"prompt": "<<SYS>> x"}, "prompt: contains '<<SYS>>'"),
        ({"messages": [{"role": "user", "content": "x"}], "raw": True}, "raw: applies to 'prompt' only"),
    ],
)
def test_turn_rules_are_the_llama2_chat_formats_with_their_wording(body, fragment):
    # The wire parser checks shape; the Llama-2 artifact's chat format (what its engine holds) the turns.
    with pytest.raises(InvalidRequest) as info:
        parsed = parse_request(body)
        chat = Llama2Chat(tokenizer=None)  # every rule here fires before anything is tokenized
        if parsed.messages is not None:
            chat.check(parsed.messages)
        else:
            chat.prompt_ids(parsed.prompt, parsed.raw, None)
    assert fragment in str(info.value)


def test_the_wire_parser_holds_no_model_to_llama2s_turn_rules():
    parsed = parse_request({"messages": [*chat("user", "user"), {"role": "user", "content": "[INST]"}]})
    assert [m.role for m in parsed.messages] == ["user", "user", "user"]
    assert parse_request({"prompt": "<<SYS>> x"}).prompt == "<<SYS>> x"
    assert "messages[0]: must be an object" in error_of({"messages": ["text"]})


def test_unknown_fields_are_ignored_like_the_schema_allows():
    assert parse_request({"prompt": "x", "lora": "none"}).prompt == "x"


def test_input_too_long():
    check_prompt_length(INPUT_LIMIT, INPUT_LIMIT)
    with pytest.raises(InputTooLong, match="prompt is 2731 tokens, the limit is 2500") as info:
        check_prompt_length(2731, INPUT_LIMIT)
    assert (info.value.http_status, info.value.api_code) == (400, 3030)


def test_usage_and_completion_json():
    usage = Usage(prompt_tokens=12, completion_tokens=5)
    assert usage.total_tokens == 17
    assert completion_json("Hi there", usage) == {
        "response": "Hi there",
        "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
    }


def test_sse_event_bytes():
    assert sse_event({"response": "Hi"}) == b'data: {"response":"Hi"}\n\n'
    assert sse_event({"response": "é🙂\n"}) == 'data: {"response":"é🙂\\n"}\n\n'.encode()
    assert sse_usage_event(Usage(3, 4)) == (
        b'data: {"response":"","usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}\n\n'
    )
    assert SSE_DONE == b"data: [DONE]\n\n"


def test_sse_event_is_one_line_for_any_text():
    event = sse_event({"response": "line1\r\nline2\u2028"})
    assert event.count(b"\n") == 2 and b"\r" not in event
    assert json.loads(event[len(b"data: ") : -2]) == {"response": "line1\r\nline2\u2028"}


def test_spec_is_read_as_a_package_resource():
    # The same lookup works from an installed wheel, which carries runtime/*.json as package data.
    from importlib import resources

    resource = resources.files("llmpack.runtime.serve").joinpath(protocol.SPEC_FILE)
    assert json.loads(resource.read_text(encoding="utf-8")) == protocol.SPEC
