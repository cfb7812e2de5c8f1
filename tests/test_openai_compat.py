"""The OpenAI-compatible routes through the official `openai` client, against the real server process."""

from __future__ import annotations

import numpy as np
import openai
import pytest
from serving import RUN, SERVER_API_KEY, WORKERS_MODEL, parse_sse

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a llama."}]


@pytest.fixture(scope="module")
def client(demo_server):
    with openai.OpenAI(base_url=demo_server.base + "/v1", api_key=SERVER_API_KEY, max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def workers(demo_http):
    return lambda body: demo_http.post(RUN, json=body).json()


def test_models_lists_both_names(client):
    assert [model.id for model in client.models.list()] == [WORKERS_MODEL, "demo"]


def test_chat_stream_equals_the_json_answer_and_the_workers_answer(client, workers):
    answer = client.chat.completions.create(model="demo", messages=CHAT, max_tokens=10, temperature=0)
    assert answer.object == "chat.completion" and answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model=WORKERS_MODEL, messages=CHAT, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert len({chunk.id for chunk in chunks}) == 1
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert streamed == answer.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.model_dump() == answer.usage.model_dump()
    # The same engine and template behind both APIs: the Workers AI route gives the same text.
    expected = workers({"messages": CHAT, "max_tokens": 10, "temperature": 0})
    got = (answer.choices[0].message.content, answer.usage.model_dump(exclude_none=True))
    assert got == (expected["response"], expected["usage"])


def test_completion_is_the_raw_prompt_continued(client, workers):
    answer = client.completions.create(model="demo", prompt="Once upon a time", max_tokens=10, temperature=0)
    expected = workers({"prompt": "Once upon a time", "raw": True, "max_tokens": 10, "temperature": 0})
    assert answer.choices[0].text == expected["response"]
    assert answer.usage.completion_tokens == 10
    streamed = client.completions.create(model="demo", prompt="Once upon a time", max_tokens=10, temperature=0,
                                         stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == expected["response"]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cut_the_answer_before_the_stop(client, stream):
    full = client.completions.create(model="demo", prompt="Once upon a time", max_tokens=24, temperature=0)
    text = full.choices[0].text
    stop = text[8:11]  # a stretch from the middle of the greedy answer
    expected = text[: text.index(stop)]
    kwargs = dict(model="demo", prompt="Once upon a time", max_tokens=24, temperature=0, stop=[stop, "\u2603never"])
    if stream:
        chunks = list(client.completions.create(**kwargs, stream=True))
        got, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        answer = client.completions.create(**kwargs)
        got, finish = answer.choices[0].text, answer.choices[0].finish_reason
        assert answer.usage.completion_tokens < 24  # generation stopped early, not just the text
    assert (got, finish) == (expected, "stop")


def test_seed_makes_sampling_repeatable(client):
    def sample(seed):
        answer = client.chat.completions.create(model="demo", messages=CHAT, max_tokens=16, temperature=1.0,
                                                top_p=0.9, seed=seed)
        return answer.choices[0].message.content

    assert sample(7) == sample(7)
    assert len({sample(7), sample(8), sample(9)}) > 1


def test_developer_role_and_text_parts_are_accepted(client, workers):
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Name "}, {"type": "text", "text": "a llama."}]}]
    answer = client.chat.completions.create(model="demo", messages=messages, max_tokens=6, temperature=0)
    expected = workers({"messages": CHAT, "max_tokens": 6, "temperature": 0})
    assert answer.choices[0].message.content == expected["response"]


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(model="gpt-4o"), openai.NotFoundError, "no such model 'gpt-4o'"),
    (dict(temperature=9), openai.BadRequestError, "temperature"),
    (dict(max_tokens=0), openai.BadRequestError, "max_tokens"),
    (dict(n=2), openai.BadRequestError, "n:"),
    (dict(messages=[]), openai.BadRequestError, "messages"),
    (dict(messages=[{"role": "tool", "content": "x"}]), openai.BadRequestError, "messages[0].role"),
    (dict(messages=[{"role": "assistant", "content": "x"}]), openai.BadRequestError, "messages[0].role"),
    (dict(stop=5), openai.BadRequestError, "stop"),
])
def test_bad_requests_raise_the_matching_openai_error(client, kwargs, error, words):
    with pytest.raises(error) as raised:
        client.chat.completions.create(**{"model": "demo", "messages": CHAT, **kwargs})
    assert words in raised.value.message


def test_a_wrong_key_raises_authentication_error(demo_server):
    with openai.OpenAI(base_url=demo_server.base + "/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


@pytest.mark.parametrize("kwargs,status", [({"content": b"{", "headers": {"Content-Type": "application/json"}}, 400),
                                           ({"content": b"{}", "headers": {"Content-Type": "text/xml"}}, 415),
                                           ({"content": b'{"x": "' + b"a" * 70000 + b'"}'}, 413)])
def test_malformed_openai_bodies_get_openai_shaped_errors(demo_http, kwargs, status):
    response = demo_http.post("/v1/chat/completions", **kwargs)
    assert response.status_code == status
    assert set(response.json()) == {"error"} and response.json()["error"]["message"]


def test_raw_stream_is_openai_framing(demo_http):
    body = {"model": "demo", "messages": CHAT, "max_tokens": 4, "temperature": 0, "stream": True}
    response = demo_http.post("/v1/chat/completions", json=body)
    chunks, done = parse_sse(response.content)
    assert done and chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert "usage" not in chunks[-1]  # only with stream_options.include_usage


@pytest.mark.parametrize("field,value", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
    ("tool_choice", "required"), ("response_format", {"type": "json_object"}), ("functions", [{"name": "f"}]),
    ("modalities", ["text", "audio"]), ("audio", {"voice": "alloy", "format": "wav"}),
])
def test_fields_that_would_change_the_answer_are_refused_by_name(client, field, value):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="demo", messages=CHAT, max_tokens=2, extra_body={field: value})
    assert raised.value.body["message"].startswith(f"{field}: ") and "not supported" in raised.value.message
    assert raised.value.param == field


@pytest.mark.parametrize("field,value", [("best_of", 3), ("echo", True), ("suffix", " the end")])
def test_completion_fields_that_would_change_the_answer_are_refused(client, field, value):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="demo", prompt="Once", max_tokens=2, extra_body={field: value})
    assert raised.value.param == field and "not supported" in raised.value.message


def test_the_neutral_values_of_unsupported_fields_are_accepted(client, workers):
    neutral = {"tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "logprobs": False,
               "logit_bias": {}, "modalities": ["text"], "parallel_tool_calls": False, "user": "u1", "n": 1}
    answer = client.chat.completions.create(model="demo", messages=CHAT, max_tokens=6, temperature=0,
                                            extra_body=neutral)
    assert answer.choices[0].message.content == workers({"messages": CHAT, "max_tokens": 6, "temperature": 0})["response"]


def test_schema_errors_name_the_param(demo_http):
    body = {"model": "demo", "messages": CHAT, "temperature": 9}
    error = demo_http.post("/v1/chat/completions", json=body).json()["error"]
    assert error["param"] == "temperature" and error["type"] == "invalid_request_error"


def test_one_model_by_id(client, demo_http):
    assert client.models.retrieve("demo").id == "demo"
    assert client.models.retrieve(WORKERS_MODEL).id == WORKERS_MODEL  # the id holds slashes
    with pytest.raises(openai.NotFoundError) as raised:
        client.models.retrieve("gpt-4o")
    assert "no such model 'gpt-4o'" in raised.value.message


def _ids(demo_http, text: str) -> list[int]:
    return demo_http.post("/tokenize", json={"prompt": text, "raw": True}).json()["tokens"][1:]  # without <s>


def test_logit_bias_plus_100_forces_a_token_and_minus_100_forbids_one(client, demo_http, demo_artifact):
    llama, once = _ids(demo_http, "llama")[-1], _ids(demo_http, "Once")[-1]

    def answer(bias: dict, tokens: int = 4) -> str:
        return client.completions.create(model="demo", prompt="Once", max_tokens=tokens, temperature=0,
                                         logit_bias={str(k): v for k, v in bias.items()}).choices[0].text

    def text(token: int, count: int = 4) -> str:
        return demo_http.post("/detokenize", json={"tokens": [token] * count}).json()["text"]

    assert answer({llama: 100}) == text(llama)
    assert answer({llama: 100, once: -100}) == text(llama)
    # -100 on the token greedy decoding picks: the answer is what the engine in process picks without it.
    from llmpack.runtime.engine import Engine
    from llmpack.runtime.sampling import SamplingParams

    engine = Engine.load(demo_artifact)
    try:
        prompt = [engine.tokenizer.bos_id, *engine.tokenizer.encode("Once")]
        [chosen] = list(engine.generate_ids(prompt, 1, SamplingParams(temperature=0)))
        banned = SamplingParams(temperature=0, logit_bias=((chosen, -100.0),))
        expected = list(engine.generate_ids(prompt, 4, banned))
    finally:
        engine.close()
    assert expected[0] != chosen
    assert answer({chosen: -100}) == engine.tokenizer.decode(expected)


@pytest.mark.parametrize("bias,words", [({"99999999": 1}, "not in this model's vocabulary"),
                                        ({"5": 101}, "logit_bias"), ({"x": 1}, "logit_bias")])
def test_bad_logit_bias_is_a_400_naming_it(client, bias, words):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="demo", prompt="Once", max_tokens=1, logit_bias=bias)
    assert words in raised.value.message and raised.value.param == "logit_bias"


def _reference_logprobs(demo_artifact, prompt_ids: list[int], steps: int) -> list[tuple[int, np.ndarray]]:
    """Greedy tokens and the log-softmax of the backend's own logits at each step, computed here."""
    from llmpack.runtime.artifact import open_artifact, open_backend

    backend = open_backend(open_artifact(demo_artifact))
    logits, out = backend.prefill(0, prompt_ids), []
    for _ in range(steps):
        z = logits.astype(np.float64)
        logprobs = z - (z.max() + np.log(np.exp(z - z.max()).sum()))
        token = int(np.argmax(logits))
        out.append((token, logprobs))
        logits = backend.decode([0], [token])[0]
    return out


def test_chat_logprobs_are_the_log_softmax_of_the_backends_logits(client, demo_http, demo_artifact):
    ids = demo_http.post("/tokenize", json={"messages": CHAT}).json()["tokens"]
    expected = _reference_logprobs(demo_artifact, ids, 6)
    answer = client.chat.completions.create(model="demo", messages=CHAT, max_tokens=6, temperature=0,
                                            logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert len(content) == 6
    for entry, (token, logprobs) in zip(content, expected):
        assert entry.logprob == pytest.approx(logprobs[token], abs=1e-4)
        best = np.argsort(-logprobs)[:3]
        assert [alt.logprob for alt in entry.top_logprobs] == pytest.approx(logprobs[best].tolist(), abs=1e-4)
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)  # greedy: the top one
    spelled = b"".join(bytes(entry.bytes) for entry in content).decode("utf-8", "replace")
    assert spelled.strip() == answer.choices[0].message.content.strip()  # the tokens' bytes spell the answer
    streamed = client.chat.completions.create(model="demo", messages=CHAT, max_tokens=6, temperature=0,
                                              logprobs=True, top_logprobs=3, stream=True)
    entries = [e for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
               for e in chunk.choices[0].logprobs.content]
    assert [e.model_dump() for e in entries] == [e.model_dump() for e in content]


def test_completion_logprobs_use_the_legacy_shape(client, demo_http, demo_artifact):
    ids = demo_http.post("/tokenize", json={"prompt": "Once upon a time", "raw": True}).json()["tokens"]
    expected = _reference_logprobs(demo_artifact, ids, 5)
    answer = client.completions.create(model="demo", prompt="Once upon a time", max_tokens=5, temperature=0,
                                       logprobs=2)
    logprobs = answer.choices[0].logprobs
    assert logprobs.token_logprobs == pytest.approx([lp[t] for t, lp in expected], abs=1e-4)
    assert len(logprobs.tokens) == len(logprobs.top_logprobs) == len(logprobs.text_offset) == 5
    assert all(len(top) <= 2 for top in logprobs.top_logprobs) and logprobs.text_offset[0] == 0
    streamed = client.completions.create(model="demo", prompt="Once upon a time", max_tokens=5, temperature=0,
                                         logprobs=2, stream=True)
    tokens = [t for chunk in streamed if chunk.choices[0].logprobs for t in chunk.choices[0].logprobs.tokens]
    assert tokens == logprobs.tokens


@pytest.mark.parametrize("kwargs,words", [(dict(top_logprobs=2), "top_logprobs: needs"),
                                          (dict(logprobs=True, top_logprobs=21), "top_logprobs")])
def test_bad_logprobs_requests_are_400s(client, kwargs, words):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="demo", messages=CHAT, max_tokens=2, **kwargs)
    assert words in raised.value.message


def test_without_logprobs_the_field_is_null(client):
    answer = client.chat.completions.create(model="demo", messages=CHAT, max_tokens=2, temperature=0)
    assert answer.choices[0].logprobs is None


@pytest.mark.parametrize("field,value", [("temperature", 9), ("top_k", 51), ("top_p", -1), ("seed", 0),
                                         ("repetition_penalty", 0), ("stream", "yes")])
def test_a_rule_reads_the_same_on_both_api_families(demo_http, field, value):
    workers = demo_http.post(RUN, json={"prompt": "hi", field: value}).json()["errors"][0]["message"]
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], field: value}
    openai_error = demo_http.post("/v1/chat/completions", json=body).json()["error"]
    assert openai_error["message"] == workers and workers.startswith(f"{field}: must be ")
    assert openai_error["param"] == field
