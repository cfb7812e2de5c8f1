"""`llm-serve run` through process faults: SIGTERM under load ends every request with a final answer, exit 0;
SIGKILL leaves nothing behind, so the same command on the same port serves again at once.

(A backend exception inside one generation is tests/test_scheduler.py's flaky_server.)
"""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serving import GREEDY, RUN, ServerProcess, metric, parse_sse, wait_until

SHUTDOWN_CODE = 3040  # Workers AI's "capacity" code, with 503: send the request again elsewhere
DRAIN_S = 120  # far longer than six 1500-token answers take on a slow, loaded CI machine (~4 s here)


def one_client(base: str, body: dict) -> tuple[int, bytes]:
    """Status and body of one request read to its end; a cut connection raises instead."""
    with httpx.Client(base_url=base, timeout=DRAIN_S + 30) as client, client.stream("POST", RUN, json=body) as response:
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


def run_under_sigterm(server: ServerProcess, bodies: list[dict], in_flight: int) -> list[str]:
    """Send every body, SIGTERM once `in_flight` of them are admitted, and classify how each ended."""
    with ThreadPoolExecutor(len(bodies)) as pool:
        futures = [pool.submit(one_client, server.base, body) for body in bodies]
        wait_until(lambda: metric(httpx.get(server.base + "/metrics").text, "llmpack_requests_in_flight") >= in_flight,
                   timeout=30)
        server.proc.send_signal(signal.SIGTERM)
        results = [future.result(timeout=DRAIN_S + 30) for future in futures]
    assert server.proc.wait(timeout=30) == 0, server.log()
    assert "timeout graceful shutdown exceeded" not in server.log()  # uvicorn never had to cut anything
    return [assert_ended_cleanly(status, raw, body["stream"]) for (status, raw), body in zip(results, bodies)]


# Neither test depends on machine speed: requests long enough to be still in flight when the signal follows
# their admission (hundreds of decode steps), and a drain that either waits far longer than they take
# anywhere, or not at all (a request admitted before SIGTERM and not finished when the drain starts is
# cancelled). 16-token requests were too short: on a fast run all six ended before /metrics saw one.


def test_sigterm_lets_in_flight_requests_finish_and_exits_0(demo_artifact, tmp_path):
    server = ServerProcess(demo_artifact, tmp_path / "serve.log", "--shutdown-timeout", str(DRAIN_S), "--max-batch", "2",
                           "--max-queue", "8")
    # 6 requests, 2 running and 4 queued when the signal comes: the drain runs the queued ones too; streamed and not
    bodies = [{"prompt": f"Go on {n}", "max_tokens": 1500, "temperature": 0, "stream": n % 2 == 0} for n in range(6)]
    assert run_under_sigterm(server, bodies, in_flight=len(bodies)) == ["done"] * len(bodies)


def test_sigterm_with_no_drain_time_gives_every_client_a_final_answer_and_exits_0(demo_artifact, tmp_path):
    server = ServerProcess(demo_artifact, tmp_path / "serve.log", "--shutdown-timeout", "0", "--max-batch", "4",
                           "--max-queue", "8")
    # 8 requests of 2900 tokens, 4 running and 4 queued when the signal comes: each ends with the shutdown's
    # answer (503 JSON, or a stream's error event with no [DONE]), never a cut connection or a hang.
    bodies = [{"prompt": f"Go on {n}", "max_tokens": 2900, "temperature": 0, "stream": n % 2 == 0} for n in range(8)]
    outcomes = run_under_sigterm(server, bodies, in_flight=len(bodies))
    assert outcomes == ["cancelled"] * len(bodies), outcomes


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
