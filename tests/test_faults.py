"""`llm-serve run` through process faults: SIGTERM under load ends every request with a final answer, exit 0;
SIGKILL leaves nothing behind, so the same command on the same port serves again at once.

(A backend exception inside one generation is tests/test_scheduler.py's flaky_server.)
"""

from __future__ import annotations

import re
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serving import GREEDY, RUN, ServerProcess, metric, parse_sse, wait_until

SHUTDOWN_CODE = 3040  # Workers AI's "capacity" code, with 503: send the request again elsewhere


def one_client(base: str, body: dict) -> tuple[int, bytes]:
    """Status and body of one request read to its end; a cut connection raises instead."""
    with httpx.Client(base_url=base, timeout=60) as client, client.stream("POST", RUN, json=body) as response:
        return response.status_code, response.read()


def assert_ended_cleanly(status: int, raw: bytes, stream: bool) -> str:
    """'done' for a complete answer, 'cancelled' for the shutdown's own final answer; anything else fails."""
    if status == 503:  # still queued at the deadline: refused before any text, as JSON
        assert httpx.Response(503, content=raw).json()["errors"][0]["code"] == SHUTDOWN_CODE
        return "cancelled"
    assert status == 200, raw[:300]
    if not stream:
        assert "usage" in httpx.Response(200, content=raw).json()
        return "done"
    events, done = parse_sse(raw)  # well framed to the last byte
    if done:
        return "done"
    assert events[-1]["errors"][0]["code"] == SHUTDOWN_CODE, events[-1]
    return "cancelled"


def generations_started(base: str) -> float:
    """Requests a worker has taken up: running now, or ended with any outcome."""
    text = httpx.get(base + "/metrics").text
    ended = sum(float(n) for n in re.findall(r"^llmpack_generations_total\{[^}]*\} (\S+)$", text, re.MULTILINE))
    return metric(text, "llmpack_requests_in_flight") - metric(text, "llmpack_queue_depth") + ended


def test_sigterm_under_load_gives_every_client_a_final_answer_and_exits_0(demo_artifact, tmp_path):
    server = ServerProcess(demo_artifact, tmp_path / "serve.log", "--shutdown-timeout", "4", "--max-batch", "4",
                           "--max-queue", "8")
    # Short ones can finish within the timeout (with room for a loaded CI machine), long ones cannot;
    # streamed and not; some only queued.
    bodies = [{"prompt": f"Go on {n}", "max_tokens": 2900 if n % 3 else 16, "temperature": 0, "stream": n % 2 == 0}
              for n in range(12)]
    short = [n for n, body in enumerate(bodies) if body["max_tokens"] == 16]
    with ThreadPoolExecutor(len(bodies)) as pool:
        futures = {n: pool.submit(one_client, server.base, bodies[n]) for n in short}
        # The short ones hold the 4 batch slots before any long one arrives, so they are never left queued
        # behind long ones (which made this test depend on thread start order).
        wait_until(lambda: generations_started(server.base) >= len(short), timeout=30)
        futures |= {n: pool.submit(one_client, server.base, body) for n, body in enumerate(bodies) if n not in short}
        # 8 long requests: 4 running, 4 queued
        wait_until(lambda: metric(httpx.get(server.base + "/metrics").text, "llmpack_requests_in_flight") >= 8,
                   timeout=30)
        server.proc.send_signal(signal.SIGTERM)
        results = [futures[n].result(timeout=30) for n in range(len(bodies))]
    assert server.proc.wait(timeout=20) == 0, server.log()
    outcomes = [assert_ended_cleanly(status, raw, body["stream"]) for (status, raw), body in zip(results, bodies)]
    assert [outcomes[n] for n in short] == ["done"] * len(short), outcomes
    assert outcomes.count("cancelled") == len(bodies) - len(short), outcomes
    assert "timeout graceful shutdown exceeded" not in server.log()  # uvicorn never had to cut anything


def test_sigkill_mid_generation_then_the_same_command_serves_again(demo_artifact, tmp_path):
    body = {"prompt": "Where do llamas live?", **GREEDY}
    first = ServerProcess(demo_artifact, tmp_path / "first.log")
    expected = httpx.post(first.base + RUN, json=body, timeout=30).json()
    with httpx.Client(base_url=first.base, timeout=30) as client, \
            client.stream("POST", RUN, json={**body, "max_tokens": 2900, "stream": True}) as response:
        chunks = response.iter_raw()
        next(chunks)  # generating when the process dies
        first.proc.send_signal(signal.SIGKILL)
        with pytest.raises(httpx.RemoteProtocolError):  # nothing can end a stream cleanly after SIGKILL
            for _ in chunks:
                pass
    assert first.proc.wait(timeout=10) == -signal.SIGKILL
    # No lock, pid file or half-written state to clean up: the same port and artifact, at once.
    second = ServerProcess(demo_artifact, tmp_path / "second.log", port=first.port)
    try:
        assert httpx.post(second.base + RUN, json=body, timeout=30).json() == expected
        assert metric(httpx.get(second.base + "/metrics").text, "llmpack_requests_in_flight") == 0
    finally:
        assert second.stop() == 0, second.log()
