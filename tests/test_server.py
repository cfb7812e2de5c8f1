"""`llm-serve run` over real HTTP: routes, wire bytes, envelopes, bad input, auth, metrics and the OpenAPI document."""

from __future__ import annotations

import json
import re
import subprocess

import httpx
import jsonschema
import pytest
from serving import GREEDY, LLM_SERVE, REST, RUN, SERVER_API_KEY, WORKERS_MODEL, metric, workers_stream_text

# --- start-up, probes, auth ------------------------------------------------------------------------


def test_start_up_logs_one_line_with_url_and_model(demo_server):
    log = demo_server.log()
    serving = [line for line in log.splitlines() if "serving" in line]
    assert len(serving) == 1 and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z " + re.escape(
        f"INFO llmpack.server: serving model demo (as {WORKERS_MODEL} or demo) on {demo_server.base}"), serving[0])
    assert SERVER_API_KEY not in log


def test_the_docs_page_works_offline_and_without_the_key(demo_server):
    page = httpx.get(demo_server.base + "/docs")
    assert page.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in page.text
    assert "cdn" not in page.text.lower() and "https://" not in page.text  # nothing fetched from elsewhere
    script = httpx.get(demo_server.base + "/docs-assets/swagger-ui-bundle.js")
    assert script.status_code == 200 and len(script.content) > 100_000
    spec = httpx.get(demo_server.base + "/openapi.json").json()
    assert spec["components"]["securitySchemes"] == {"apiKey": {"type": "http", "scheme": "bearer"}}
    assert spec["paths"]["/v1/models"]["get"]["security"] == [{"apiKey": []}]
    assert spec["paths"]["/health"]["get"]["security"] == []
    assert httpx.get(demo_server.base + "/docs-assets/../metrics").status_code in (401, 404)


def test_probes_answer_without_the_key(demo_server):
    assert httpx.get(demo_server.base + "/health").json() == {"status": "ok"}
    assert httpx.get(demo_server.base + "/ready").json() == {"ready": True, "models": [WORKERS_MODEL, "demo"]}


@pytest.mark.parametrize("method,path", [("GET", "/metrics"), ("GET", "/v1/models"), ("POST", RUN), ("POST", REST),
                                         ("POST", "/tokenize"), ("POST", "/detokenize"),
                                         ("GET", "/v1/models/demo"), ("POST", "/v1/chat/completions"),
                                         ("GET", "/no/such/route")])
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", f"Basic {SERVER_API_KEY}",
                                           f"Bearer {SERVER_API_KEY[:-1]}"])
def test_every_other_route_needs_the_key(demo_server, method, path, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    response = httpx.request(method, demo_server.base + path, headers=headers, json={"prompt": "hi"})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert SERVER_API_KEY not in response.text
    if path.startswith("/v1/"):
        assert response.json()["error"]["type"] == "authentication_error"
    else:
        assert response.json() == {"result": {}, "success": False, "messages": [], "errors": [
            {"code": 10000, "message": "missing or wrong API key; send the header 'Authorization: Bearer <key>'",
             "request_id": response.headers["x-request-id"]}]}


# --- Workers AI routes ------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_workers_route_sends_exactly_the_bytes_llm_serve_infer_prints(demo_http, demo_artifact, stream):
    body = {"prompt": "Tell me a story about a llama.", "stream": stream, **GREEDY}
    cli = subprocess.run([LLM_SERVE, "infer", str(demo_artifact), json.dumps(body), "--threads", "1"],
                         capture_output=True, check=True).stdout
    response = demo_http.post(RUN, json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream" if stream else "application/json")
    assert response.content == cli


@pytest.mark.parametrize("model", [WORKERS_MODEL, "demo", "%40cf%2Fmeta%2Fllama-2-7b-chat-fp16"])
@pytest.mark.parametrize("body", [{"prompt": "Where do llamas live?"},
                                  {"messages": [{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "Hello!"}]}])
def test_greedy_stream_equals_the_json_answer(demo_http, model, body):
    plain = demo_http.post(f"/ai/run/{model}", json={**body, **GREEDY})
    streamed = demo_http.post(f"/ai/run/{model}", json={**body, **GREEDY, "stream": True})
    assert plain.status_code == streamed.status_code == 200
    assert workers_stream_text(streamed.content) == (plain.json()["response"], plain.json()["usage"])
    assert plain.json()["usage"]["completion_tokens"] == GREEDY["max_tokens"]


def test_rest_route_wraps_json_in_the_envelope_but_not_streams(demo_http):
    body = {"messages": [{"role": "user", "content": "Hi there"}], **GREEDY}
    plain = demo_http.post(RUN, json=body).json()
    assert demo_http.post(REST, json=body).json() == {"result": plain, "success": True, "errors": [], "messages": []}
    streamed = demo_http.post(REST, json={**body, "stream": True})
    assert workers_stream_text(streamed.content) == (plain["response"], plain["usage"])


def test_curl_style_form_content_type_is_read_as_json(demo_http):
    # `curl -d` (Cloudflare's own examples) sends application/x-www-form-urlencoded.
    body = json.dumps({"prompt": "Hi", **GREEDY})
    response = demo_http.post(REST, content=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200 and response.json()["success"] is True


def test_tokenize_returns_the_ids_the_engine_feeds(demo_http, demo_artifact):
    from llmpack.runtime.engine import Engine
    from llmpack.runtime.serve.protocol import parse_request

    body = {"messages": [{"role": "user", "content": "Count my tokens"}]}
    expected = Engine.load(demo_artifact).request_ids(parse_request(body))
    assert demo_http.post("/tokenize", json=body).json() == {"tokens": expected, "count": len(expected)}


def test_detokenize_gives_back_the_text_of_tokenize(demo_http):
    text = "Once upon a time, a llama said: héllo 🦙"
    ids = demo_http.post("/tokenize", json={"prompt": text, "raw": True}).json()["tokens"]
    assert demo_http.post("/detokenize", json={"tokens": ids}).json() == {"text": text, "count": len(ids)}


@pytest.mark.parametrize("body,words", [
    ({}, '"tokens"'), ({"tokens": "12"}, "tokens: must be a list"), ({"tokens": [1, -1]}, "tokens[1]: -1"),
    ({"tokens": [True]}, "tokens[0]: True"), ({"tokens": [10**9]}, "is not a token id"),
    ({"tokens": [1], "skip": True}, "skip: not a field"),
])
def test_detokenize_refuses_what_is_not_token_ids(demo_http, body, words):
    response = demo_http.post("/detokenize", json=body)
    assert response.status_code == 400 and words in response.json()["errors"][0]["message"], response.text


# --- bad input: every status, always the JSON error shape, never a 5xx ------------------------------

LONG_CHAT = [{"role": "user", "content": "llama " * 680}, {"role": "assistant", "content": "alpaca " * 580},
             {"role": "user", "content": "vicuna " * 580}]
BAD_WORKERS = [
    ("POST", RUN, {"json": {"prompt": 5}}, 400, 5006, "prompt: must be a string"),
    ("POST", RUN, {"json": {"prompt": "a", "messages": []}}, 400, 5006, "either 'prompt' or 'messages'"),
    ("POST", RUN, {"json": {"max_tokens": 3}}, 400, 5006, "needs 'prompt'"),
    ("POST", RUN, {"json": {"prompt": "a", "max_tokens": 0}}, 400, 5006, "max_tokens: must be an integer ≥ 1"),
    ("POST", RUN, {"json": {"prompt": "a" * 4097}}, 400, 5006, "prompt: is longer than 4096"),
    ("POST", RUN, {"json": {"prompt": "a", "temperature": 5.5}}, 400, 5006, "temperature: must be between"),
    ("POST", RUN, {"json": {"prompt": "a", "stream": "yes"}}, 400, 5006, "stream: must be a boolean"),
    ("POST", RUN, {"json": {"messages": [{"role": "assistant", "content": "x"}]}}, 400, 5006, "messages[0].role"),
    ("POST", RUN, {"json": {"prompt": "[INST] hi"}}, 400, 5006, "prompt: contains '[INST]'"),
    ("POST", RUN, {"json": {"messages": LONG_CHAT}}, 400, 3030, "the limit is 2500"),
    ("POST", RUN, {"json": ["prompt"]}, 400, 5006, "must be a JSON object"),
    ("POST", RUN, {"content": b'{"prompt": '}, 400, 5006, "not valid JSON"),
    ("POST", RUN, {"content": b'{"prompt": "\xff"}'}, 400, 5006, "not valid JSON"),
    ("POST", RUN, {"content": b"[" * 5000 + b"]" * 5000}, 400, 5006, "nested too deeply"),
    ("POST", RUN, {"content": b""}, 400, 5006, "body is empty"),
    ("POST", RUN, {"content": b'{"prompt": "a"}', "headers": {"Content-Type": "text/plain"}}, 415, 5006, "text/plain"),
    ("POST", REST, {"files": {"prompt": b"hi"}}, 415, 5006, "multipart/form-data"),
    ("POST", RUN, {"content": b'{"prompt": "' + b"a" * 70000 + b'"}'}, 413, 3006, "the limit is 65536"),
    ("POST", RUN, {"content": lambda: iter([b'{"prompt": "'] + [b"a" * 8192] * 9)}, 413, 3006, "over the limit"),
    ("POST", "/ai/run/@cf/meta/llama-3-8b-instruct", {"json": {"prompt": "a"}}, 404, 3042, "no such model"),
    ("POST", REST.replace("fp16", "int8"), {"json": {"prompt": "a"}}, 404, 3042, "no such model"),
    ("GET", RUN, {}, 405, 7001, "GET is not allowed on /ai/run/@cf/meta/llama-2-7b-chat-fp16; use POST"),
    ("POST", "/health", {}, 405, 7001, "POST is not allowed on /health; use GET"),
    ("GET", "/ai/nothing", {}, 404, 7000, "no route /ai/nothing"),
    ("POST", "/tokenize", {"json": {"prompt": 1}}, 400, 5006, "prompt: must be a string"),
]


@pytest.mark.parametrize("method,path,kwargs,status,code,words", BAD_WORKERS,
                         ids=[f"{c[3]}-{c[5][:28]}" for c in BAD_WORKERS])
def test_bad_workers_requests_get_a_json_error_naming_the_problem(demo_http, method, path, kwargs, status, code, words):
    if callable(kwargs.get("content")):
        kwargs = {**kwargs, "content": kwargs["content"]()}  # a generator: sent chunked, no Content-Length
    response = demo_http.request(method, path, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["success"] is False and body["result"] == {} and body["messages"] == []
    assert body["errors"][0]["code"] == code
    assert words in body["errors"][0]["message"]
    assert "Traceback" not in response.text


# --- metrics ------------------------------------------------------------------------------------------


def test_metrics_count_requests_tokens_and_latencies(demo_http):
    before = demo_http.get("/metrics").text
    usage = demo_http.post(RUN, json={"prompt": "Count me", **GREEDY}).json()["usage"]
    demo_http.post(RUN, json={"prompt": 1})
    response = demo_http.get("/metrics")
    after = response.text
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"

    def grew(name, labels=""):
        return metric(after, name, labels) - metric(before, name, labels)

    assert grew("llmpack_http_requests_total", 'route="/ai/run/{model}",status="200"') == 1
    assert grew("llmpack_http_requests_total", 'route="/ai/run/{model}",status="400"') == 1
    assert grew("llmpack_prompt_tokens_total") == usage["prompt_tokens"]
    assert grew("llmpack_generated_tokens_total") == usage["completion_tokens"]
    assert grew("llmpack_time_to_first_token_seconds_count") == 1
    assert 1 <= grew("llmpack_inter_token_latency_seconds_count") <= usage["completion_tokens"] - 1
    assert metric(after, "llmpack_queue_depth") == metric(after, "llmpack_requests_in_flight") == 0
    assert grew("llmpack_http_request_duration_seconds_count", 'route="/ai/run/{model}"') == 2
    assert grew("llmpack_queue_wait_seconds_count") == 1  # the 400 never queued
    # one decode step per token after the first (the prefill makes the first), each of one sequence
    assert grew("llmpack_decode_batch_size_count") == grew("llmpack_decode_batch_size_sum") >= 1
    assert metric(after, "process_resident_memory_bytes") > 0 and metric(after, "process_cpu_seconds_total") > 0
    sample = re.compile(r'^[a-z_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? (\d+(\.\d+)?(e[+-]?\d+)?)$')
    assert all(sample.match(line) for line in after.splitlines() if not line.startswith("#")), after


def test_metrics_show_requests_that_reused_a_cached_prefix(demo_http):
    before = demo_http.get("/metrics").text
    first = demo_http.post(RUN, json={"prompt": "Tell me about llamas", **GREEDY}).json()
    again = demo_http.post(RUN, json={"prompt": "Tell me about llamas", **GREEDY}).json()
    after = demo_http.get("/metrics").text
    assert "# TYPE llmpack_prefix_cache_hits_total counter" in after
    assert metric(after, "llmpack_prefix_cache_hits_total") - metric(before, "llmpack_prefix_cache_hits_total") >= 1
    # at least the template and the default system prompt were copied instead of computed
    reused = metric(after, "llmpack_prefix_cache_reused_tokens_total") - \
        metric(before, "llmpack_prefix_cache_reused_tokens_total")
    assert reused >= 30 and again == first
    assert metric(after, "llmpack_prefix_cache_bytes") > 0


# --- the OpenAPI document ------------------------------------------------------------------------------

ACCEPTED = [{"prompt": "hi"}, {"prompt": "hi", "raw": True, "max_tokens": 1, "stream": False},
            {"messages": [{"role": "user", "content": "hi"}], "seed": 1, "top_k": 50, "top_p": 0.5}]
REJECTED = [{}, {"prompt": 1}, {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, {"prompt": "a" * 4097},
            {"prompt": "a", "max_tokens": 0}, {"prompt": "a", "raw": "no"}, {"messages": [{"role": "user"}]},
            {"messages": "hi"}, {"prompt": "a", "stream": 1}]


def test_openapi_document_lists_the_routes_and_what_they_accept(demo_http):
    spec = demo_http.get("/openapi.json").json()
    routes = {(path, method) for path, item in spec["paths"].items() for method in item}
    assert routes == {("/ai/run/{model}", "post"), ("/client/v4/accounts/{account_id}/ai/run/{model}", "post"),
                      ("/tokenize", "post"), ("/detokenize", "post"), ("/health", "get"), ("/ready", "get"),
                      ("/metrics", "get"), ("/v1/chat/completions", "post"), ("/v1/completions", "post"),
                      ("/v1/models", "get"), ("/v1/models/{model}", "get")}
    documented = {path: {method: op["responses"] for method, op in item.items()}
                  for path, item in spec["paths"].items()}
    assert "422" not in json.dumps(documented)  # FastAPI's default; this server answers 400
    schema = spec["paths"]["/ai/run/{model}"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    validator = jsonschema.Draft202012Validator(schema)
    for body in ACCEPTED:
        assert validator.is_valid(body) and demo_http.post("/tokenize", json=body).status_code == 200, body
    for body in REJECTED:
        assert not validator.is_valid(body) and demo_http.post("/tokenize", json=body).status_code == 400, body
    for name, field in schema["oneOf"][0]["properties"].items():
        for value, ok in _bounds(field):
            body = {"prompt": "hi", name: value}
            assert validator.is_valid(body) == ok == (demo_http.post("/tokenize", json=body).status_code == 200), body


def _bounds(field: dict) -> list[tuple[object, bool]]:
    """Values at and just past each documented bound, with whether the document allows them."""
    step = 1 if field.get("type") == "integer" else 0.001
    cases = []
    if "minimum" in field:
        cases += [(field["minimum"], True), (field["minimum"] - step, False)]
    if "exclusiveMinimum" in field:
        cases += [(field["exclusiveMinimum"], False), (field["exclusiveMinimum"] + step, True)]
    if "maximum" in field:
        cases += [(field["maximum"], True), (field["maximum"] + step, False)]
    return cases
