"""The scheduler, stop strings and metrics in-process, and a failing generation answered over real HTTP."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from serving import free_port, parse_sse

from llmpack.runtime.errors import CapacityExceeded
from llmpack.runtime.metrics import Metrics
from llmpack.runtime.protocol import Usage, parse_request
from llmpack.runtime.scheduler import FINISH_CANCELLED, Failed, Finished, Piece, Scheduler, ShuttingDown
from llmpack.runtime.streaming import StopFilter


class FakeStream:
    """A TextStream stand-in: yields `pieces`, optionally waits on `gate` first, raises at `fail_at`."""

    def __init__(self, pieces, gate: threading.Event | None = None, fail_at: int | None = None):
        self.pieces, self.gate, self.fail_at = pieces, gate, fail_at
        self.generated, self.closed = 0, False

    def __iter__(self):
        try:
            for index, piece in enumerate(self.pieces):
                if self.gate is not None:
                    self.gate.wait(10)
                if index == self.fail_at:
                    raise RuntimeError("simulated backend fault")
                self.generated += 1
                yield piece
        finally:
            self.closed = True

    @property
    def usage(self) -> Usage:
        return Usage(prompt_tokens=3, completion_tokens=self.generated)

    @property
    def finish_reason(self) -> str | None:
        return "length" if self.generated == len(self.pieces) else None


class FakeEngine:
    max_batch = 1
    prefix_cache = None
    """Streams by prompt: 'gated' waits for `gate`, 'boom' fails after one piece, else three pieces."""

    def __init__(self):
        self.gate = threading.Event()
        self.streams: list[FakeStream] = []

    def stream(self, request):
        stream = FakeStream(["a", "b", "c"], gate=self.gate if request.prompt == "gated" else None,
                            fail_at=1 if request.prompt == "boom" else None)
        self.streams.append(stream)
        return stream


async def drain(job) -> list:
    return [event async for event in job.events()]


async def until_running(job) -> None:
    while job.state != "running":
        await asyncio.sleep(0.005)


def request(prompt: str):
    return parse_request({"prompt": prompt, "raw": True})


def started(engine, max_queue: int = 4, **options) -> Scheduler:
    scheduler = Scheduler(engine, max_queue, **options)
    scheduler.start()
    return scheduler


def test_queue_bound_cancel_frees_the_place_and_failures_stay_in_their_job():
    async def scenario():
        engine, metrics = FakeEngine(), Metrics()
        scheduler = started(engine, max_queue=1, metrics=metrics)
        running = scheduler.submit(request("gated"))
        await until_running(running)
        waiting = scheduler.submit(request("next"))
        with pytest.raises(CapacityExceeded):
            scheduler.submit(request("one too many"))
        waiting.cancel()
        assert scheduler.queue_depth == 0  # at once, not when the worker gets there
        assert await drain(waiting) == [Finished(Usage(0, 0), FINISH_CANCELLED)]
        failing = scheduler.submit(request("boom"))
        engine.gate.set()
        assert [e for e in await drain(running) if isinstance(e, Piece)] == [Piece("a"), Piece("b"), Piece("c")]
        events = await drain(failing)
        assert events[0] == Piece("a") and isinstance(events[-1], Failed)
        assert events[-1].error.http_status == 500 and "simulated" not in events[-1].error.message
        assert [type(e) for e in await drain(scheduler.submit(request("after")))] == [Piece, Piece, Piece, Finished]
        scheduler.close(timeout=5)
        return engine, metrics

    engine, metrics = asyncio.run(scenario())
    assert all(stream.closed for stream in engine.streams)
    assert metrics.generations == {"finished": 2, "failed": 1, FINISH_CANCELLED: 1}


def test_concurrency_runs_that_many_jobs_and_widens_the_bound():
    async def scenario():
        engine = FakeEngine()
        scheduler = started(engine, max_queue=1, concurrency=2)
        jobs = [scheduler.submit(request("gated")) for _ in range(3)]
        await until_running(jobs[0])
        await until_running(jobs[1])
        with pytest.raises(CapacityExceeded):
            scheduler.submit(request("one too many"))
        states = [job.state for job in jobs]
        engine.gate.set()
        ends = [(await drain(job))[-1] for job in jobs]
        scheduler.close(timeout=5)
        return states, ends

    states, ends = asyncio.run(scenario())
    assert states == ["running", "running", "waiting"] and all(end.finish_reason == "length" for end in ends)


def test_cancelling_a_running_job_stops_it_between_tokens():
    async def scenario():
        engine = FakeEngine()
        scheduler = started(engine)
        job = scheduler.submit(request("gated"))
        await until_running(job)
        job.cancel()
        engine.gate.set()
        events = await drain(job)
        scheduler.close(timeout=5)
        return events, engine.streams[0]

    events, stream = asyncio.run(scenario())
    assert events[-1].finish_reason == FINISH_CANCELLED and stream.generated == 1 and stream.closed


def test_close_fails_what_it_cancels_with_503_and_refuses_new_jobs():
    async def scenario():
        engine = FakeEngine()
        scheduler = started(engine)
        jobs = [scheduler.submit(request("gated")) for _ in range(3)]
        await until_running(jobs[0])
        scheduler.close(timeout=0)  # the worker is still held at the gate
        engine.gate.set()
        with pytest.raises(ShuttingDown):
            scheduler.submit(request("late"))
        return [(await drain(job))[-1] for job in jobs]

    # Nobody may mistake a cut-off answer for a complete one: each gets an error, not a Finished.
    assert [(type(last), last.error.http_status) for last in asyncio.run(scenario())] == [(Failed, 503)] * 3


@pytest.mark.parametrize("stops,pieces,sent,stopped", [
    (["END"], ["abc", "E", "N", "Dxyz"], "abc", True),
    (["END"], ["abc", "EN", "x"], "abcENx", False),
    (["\n\n", "Q:"], ["one\n", "two", "\n", "\nthree"], "one\ntwo", True),
    ([], ["a", "b"], "ab", False),
])
def test_stop_filter_never_sends_text_at_or_after_a_stop(stops, pieces, sent, stopped):
    stop_filter = StopFilter(stops)
    out = "".join(stop_filter.feed(piece) for piece in pieces) + stop_filter.flush()
    assert (out, stop_filter.stopped) == (sent, stopped)


def test_metrics_histogram_is_cumulative():
    metrics = Metrics()
    metrics.first_token(0.02)
    metrics.next_tokens(0.004, 2)
    text = metrics.render()
    assert 'llmpack_time_to_first_token_seconds_bucket{le="0.01"} 0' in text
    assert 'llmpack_time_to_first_token_seconds_bucket{le="0.025"} 1' in text
    assert 'llmpack_inter_token_latency_seconds_bucket{le="0.0025"} 2' in text
    assert "llmpack_inter_token_latency_seconds_count 2" in text


# --- an exception inside one generation, over real HTTP ---------------------------------------------


class FlakyEngine:
    """The real demo engine, except that prompts containing 'FAIL@n' raise before their n-th piece.

    No request can make the real engine fail (its inputs are validated and bounded), so the fault is
    injected here, in the test, and nowhere in the library.
    """

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def stream(self, request):
        stream = self._engine.stream(request)
        text = request.prompt or ""
        return _Failing(stream, int(text.split("FAIL@")[1][0])) if "FAIL@" in text else stream


class _Failing:
    def __init__(self, stream, fail_at: int):
        self.stream, self.fail_at = stream, fail_at

    def __iter__(self):
        pieces = iter(self.stream)
        try:
            for index, piece in enumerate(pieces):
                if index == self.fail_at:
                    raise RuntimeError("simulated backend fault")
                yield piece
        finally:
            pieces.close()

    def __getattr__(self, name):
        return getattr(self.stream, name)


@pytest.fixture(scope="module")
def flaky_server(demo_artifact):
    import uvicorn

    from llmpack.runtime.engine import Engine, EngineOptions
    from llmpack.runtime.server import create_app

    app = create_app(FlakyEngine(Engine.load(demo_artifact, EngineOptions(threads=1))))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/ready").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)
    yield base
    server.should_exit = True
    thread.join(15)


@pytest.mark.parametrize("path,envelope", [("/ai/run/demo", True), ("/v1/completions", False)])
def test_a_generation_that_fails_before_any_text_gets_a_500_json(flaky_server, path, envelope):
    body = {"prompt": "FAIL@0 now", "max_tokens": 8, "stream": True, **({"model": "demo"} if not envelope else {})}
    response = httpx.post(flaky_server + path, json=body)
    assert response.status_code == 500 and response.headers["content-type"] == "application/json"
    message = response.json()["errors"][0]["message"] if envelope else response.json()["error"]["message"]
    assert message == "the generation failed inside the engine; the server log has the details"
    assert "simulated" not in response.text and "Traceback" not in response.text
    assert httpx.post(flaky_server + "/ai/run/demo", json={"prompt": "fine", "max_tokens": 4}).status_code == 200


def test_a_generation_that_fails_midway_ends_its_stream_with_an_error_event(flaky_server):
    plain = httpx.post(flaky_server + "/ai/run/demo", json={"prompt": "FAIL@3 later", "max_tokens": 8})
    assert plain.status_code == 500 and plain.json()["errors"][0]["code"] == 5000
    streamed = httpx.post(flaky_server + "/ai/run/demo",
                          json={"prompt": "FAIL@3 later", "max_tokens": 8, "stream": True})
    events, done = parse_sse(streamed.content)
    assert streamed.status_code == 200 and not done  # no [DONE]: the client can tell it is incomplete
    assert [set(e) for e in events[:3]] == [{"response"}] * 3 and events[-1]["success"] is False
    metrics = httpx.get(flaky_server + "/metrics").text
    assert 'llmpack_generations_total{outcome="failed"}' in metrics and "llmpack_requests_in_flight 0" in metrics


def test_ready_only_after_the_warm_up_generation():
    from starlette.testclient import TestClient

    from llmpack.runtime.server import create_app

    class SlowStart(FakeEngine):
        model_name = "fake"

        def stream(self, request):
            return FakeStream(["warm"], gate=self.gate)

    engine = SlowStart()
    with TestClient(create_app(engine)) as client:
        assert client.get("/health").status_code == 200
        not_yet = client.get("/ready")
        assert not_yet.status_code == 503 and "warm-up" in not_yet.json()["reason"]
        engine.gate.set()
        deadline = time.monotonic() + 10
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
