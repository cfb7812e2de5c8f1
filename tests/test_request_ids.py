"""Request ids and the access log, through the real server: one id per request, from the client or made up,
echoed in the X-Request-ID header, in error bodies (both API families, streams included) and in one
access-log line per request that says what the request cost."""

from __future__ import annotations

import re

import httpx
import pytest
from serving import GREEDY, RUN, SERVER_API_KEY, parse_sse, wait_until

GENERATED = re.compile(r"[0-9a-f]{24}")


def access_lines(server, request_id: str) -> list[str]:
    return [line for line in server.log().splitlines() if "llmpack.access" in line and f"id={request_id}" in line]


def test_a_client_id_is_echoed_and_logged_with_the_request_cost(demo_server, demo_http):
    response = demo_http.post(RUN, json={**GREEDY, "prompt": "Hello", "max_tokens": 5},
                              headers={"X-Request-ID": "trace-42.a"})
    assert response.status_code == 200 and response.headers["x-request-id"] == "trace-42.a"
    usage = response.json()["usage"]
    wait_until(lambda: access_lines(demo_server, "trace-42.a"), timeout=30)
    [line] = access_lines(demo_server, "trace-42.a")
    assert f"POST /ai/run/{{model}} 200 prompt={usage['prompt_tokens']} completion={usage['completion_tokens']} ttft_ms=" in line
    assert re.search(r"ttft_ms=\d+\.\d total_ms=\d+\.\d id=trace-42\.a$", line), line


@pytest.mark.parametrize("given", [None, "", "has spaces", "x" * 200, "new\nline"])
def test_an_unusable_or_missing_id_is_replaced_by_a_generated_one(demo_http, given):
    headers = {} if given is None else {"X-Request-ID": given.replace("\n", "%0A")}
    response = demo_http.get("/v1/models", headers=headers)
    assert GENERATED.fullmatch(response.headers["x-request-id"]), response.headers["x-request-id"]


def test_ids_differ_per_request(demo_http):
    ids = {demo_http.get("/health").headers["x-request-id"] for _ in range(5)}
    assert len(ids) == 5


def test_error_bodies_carry_the_id_in_both_api_families(demo_server, demo_http):
    workers = demo_http.post(RUN, json={"prompt": 5}, headers={"X-Request-ID": "w-err"})
    assert workers.status_code == 400 and workers.json()["errors"][0]["request_id"] == "w-err"
    openai = demo_http.post("/v1/chat/completions", json={"model": "demo", "messages": []},
                            headers={"X-Request-ID": "o-err"})
    assert openai.status_code == 400 and openai.json()["error"]["request_id"] == "o-err"
    unauthorized = httpx.get(demo_server.base + "/v1/models", headers={"X-Request-ID": "no-key"})
    assert unauthorized.status_code == 401 and unauthorized.json()["error"]["request_id"] == "no-key"
    assert SERVER_API_KEY not in unauthorized.text
    wait_until(lambda: access_lines(demo_server, "no-key"), timeout=30)
    assert "GET /v1/models 401" in access_lines(demo_server, "no-key")[0]


def test_a_stream_is_logged_once_it_ends(demo_server, demo_http):
    response = demo_http.post(RUN, json={**GREEDY, "prompt": "Hello", "max_tokens": 4, "stream": True},
                              headers={"X-Request-ID": "s-1"})
    _, done = parse_sse(response.content)
    assert done and response.headers["x-request-id"] == "s-1"
    wait_until(lambda: access_lines(demo_server, "s-1"), timeout=30)
    assert " 200 prompt=" in access_lines(demo_server, "s-1")[0] and "completion=4" in access_lines(demo_server, "s-1")[0]
