"""Admission, the token hand-off, stop strings and metrics in-process, and a failing generation over real HTTP.

The in-process tests run the real engine pipeline (batch scheduler thread → LoopTokens → Generation)
over a scripted backend whose steps can be held at a gate or made to fail.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from serving import free_port, metric, parse_sse

from llmpack.runtime.chat_format import Llama2Chat
from llmpack.runtime.engine import Engine, EngineOptions
from llmpack.runtime.errors import CapacityExceeded, LlmpackError
from llmpack.runtime.generate import FINISH_CANCELLED
from llmpack.runtime.serve.admission import Admission, ShuttingDown
from llmpack.runtime.serve.metrics import Metrics
from llmpack.runtime.serve.protocol import parse_request
from llmpack.runtime.serve.streaming import Generation, StopFilter
from llmpack.runtime.tokenizer import Tokenizer

GATED, BOOM = 7, 8  # a prompt's second id picks the behaviour: wait at the gate each step, fail at step 2


class ScriptedBackend:
    """Answers every sequence with `answer`, one id per step; optionally held at `gate` or failing."""

    name, context_length = "scripted", 64

    def __init__(self, vocab_size: int, answer: list[int], max_batch: int = 1):
        self.vocab_size, self.answer, self.max_batch = vocab_size, answer, max_batch
        self.gate = threading.Event()
        self.slots: dict[int, list[int]] = {}
        self.steps: dict[int, int] = {}

    def cached_tokens(self, slot: int) -> int:
        return len(self.slots.get(slot, []))

    def prefill(self, slot, ids):
        self.slots.setdefault(slot, []).extend(ids)
        self.steps[slot] = 0
        return self._logits(slot)

    def decode(self, slots, ids):
        for slot, token in zip(slots, ids):
            self.slots[slot].append(token)
            self.steps[slot] += 1
        kinds = {self.slots[slot][1] for slot in slots}
        if GATED in kinds:
            self.gate.wait(10)
        if BOOM in kinds and any(self.steps[s] == 2 for s in slots):
            raise RuntimeError("simulated backend fault")
        return np.stack([self._logits(slot) for slot in slots])

    def reset(self, slot):
        self.slots.pop(slot, None)

    def _logits(self, slot):
        logits = np.zeros(self.vocab_size, dtype=np.float32)
        logits[self.answer[self.steps[slot] % len(self.answer)]] = 1.0
        return logits


@pytest.fixture(scope="module")
def tokenizer(demo_artifact) -> Tokenizer:
    return Tokenizer.from_file(demo_artifact / "tokenizer.model")


def answer_ids(tokenizer) -> list[int]:
    """Three ids that each decode to visible ASCII text on their own: every token is a piece of text."""
    visible = (i for i in range(3, tokenizer.vocab_size) if tokenizer.decode([i]).strip().isalpha())
    return [next(visible) for _ in range(3)]


def scripted_engine(tokenizer, max_batch: int = 1) -> Engine:
    answer = answer_ids(tokenizer)
    backend = ScriptedBackend(tokenizer.vocab_size, answer, max_batch)
    artifact = SimpleNamespace(manifest=SimpleNamespace(stop_token_ids=(tokenizer.eos_id,), name="scripted"))
    return Engine(artifact, backend, tokenizer, None, EngineOptions(prefix_cache_mb=0), Llama2Chat(tokenizer))


GREEDY3 = parse_request({"prompt": "x", "raw": True, "max_tokens": 3, "temperature": 0})


def admit(admission: Admission, kind: int) -> Generation:
    return Generation(admission.submit(GREEDY3, [1, kind, 5]), admission, admission.engine.tokenizer)


async def until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.005)


async def outcome(generation: Generation):
    try:
        return await generation.text(), generation.finished
    except Exception as exc:  # noqa: BLE001 - the test compares the error
        return None, exc


def test_queue_bound_cancel_frees_the_place_and_failures_stay_in_their_sequence(tokenizer):
    async def scenario():
        engine, metrics = scripted_engine(tokenizer), Metrics()
        admission = Admission(engine, max_queue=1, metrics=metrics)
        running = admit(admission, GATED)
        await until(lambda: engine.scheduler.active == 1)
        waiting = admit(admission, 0)
        with pytest.raises(CapacityExceeded):
            admit(admission, 0)
        waiting.stop()
        await until(lambda: admission.in_flight == 1)  # at once, not when a slot frees
        assert (await outcome(waiting))[1].finish_reason == FINISH_CANCELLED
        failing = admit(admission, BOOM)
        engine.backend.gate.set()
        results = [await outcome(g) for g in (running, failing)]
        results.append(await outcome(admit(admission, 0)))
        engine.close()
        return results, metrics

    (ran, failed, after), metrics = asyncio.run(scenario())
    answer = tokenizer.decode(answer_ids(tokenizer))
    assert ran[0] == answer and ran[1].finish_reason == "length" and after[0] == answer
    assert failed[0] is None and failed[1].http_status == 500 and "simulated" not in failed[1].message
    text = metrics.render()
    counts = {outcome: metric(text, "llmpack_generations_total", f'outcome="{outcome}"')
              for outcome in ("finished", "failed", FINISH_CANCELLED)}
    assert counts == {"finished": 2, "failed": 1, FINISH_CANCELLED: 1}


def test_batch_slots_widen_the_bound(tokenizer):
    async def scenario():
        engine = scripted_engine(tokenizer, max_batch=2)
        admission = Admission(engine, max_queue=1)
        generations = [admit(admission, GATED) for _ in range(3)]
        await until(lambda: engine.scheduler.active == 2)
        with pytest.raises(CapacityExceeded):
            admit(admission, GATED)
        queued = engine.scheduler.queue_depth
        engine.backend.gate.set()
        results = [await outcome(g) for g in generations]
        engine.close()
        return queued, results

    queued, results = asyncio.run(scenario())
    assert queued == 1 and all(finished.finish_reason == "length" for _, finished in results)


def test_cancelling_a_running_sequence_stops_it_between_tokens(tokenizer):
    async def scenario():
        engine = scripted_engine(tokenizer)
        admission = Admission(engine, max_queue=4)
        generation = admit(admission, GATED)
        await generation.first_text()  # the prefill's token; the first decode step waits at the gate
        generation.stop()
        engine.backend.gate.set()
        result = await outcome(generation)
        engine.close()
        return result

    text, finished = asyncio.run(scenario())
    assert finished.finish_reason == FINISH_CANCELLED and finished.usage.completion_tokens < 3


def test_close_fails_what_it_cancels_with_503_and_refuses_new_requests(tokenizer):
    async def scenario():
        engine = scripted_engine(tokenizer)
        admission = Admission(engine, max_queue=4)
        generations = [admit(admission, GATED) for _ in range(3)]
        await until(lambda: engine.scheduler.active == 1)
        closing = asyncio.get_running_loop().run_in_executor(None, admission.close, 10)
        await until(lambda: admission.closed)
        engine.backend.gate.set()
        await closing
        with pytest.raises(ShuttingDown):
            admit(admission, 0)
        results = [await outcome(g) for g in generations]
        engine.close()
        return results

    # Nobody may mistake a cut-off answer for a complete one: each gets an error, not a Finished.
    assert [(text, type(error), error.http_status) for text, error in asyncio.run(scenario())] == \
        [(None, ShuttingDown, 503)] * 3


def test_tokens_ready_together_cross_in_one_wake_up(tokenizer):
    """The batch thread's puts while the loop is busy are taken together: one piece, same text."""
    async def scenario():
        engine = scripted_engine(tokenizer)
        admission = Admission(engine, max_queue=4)
        tokens = admission.submit(GREEDY3, [1, 0, 5])
        time.sleep(0.5)  # the loop is blocked: every token and the end arrive before it takes any
        taken = await tokens.take()
        engine.close()
        return taken

    ids, logprobs, end = asyncio.run(scenario())
    assert ids == answer_ids(tokenizer) and end == ("length", None) and logprobs == [None] * len(ids)


def test_text_taken_with_a_failure_goes_out_before_the_error(tokenizer):
    """A loop that falls behind takes the tokens and the failure in one hand-off: the text is not lost."""
    async def scenario():
        engine = scripted_engine(tokenizer)
        admission = Admission(engine, max_queue=4)
        generation = admit(admission, BOOM)  # two tokens, then the step that makes the third fails
        time.sleep(0.5)  # the loop is blocked: both tokens and the failure arrive before it takes any
        pieces, error = [], None
        try:
            async for piece in generation.pieces():
                pieces.append(piece)
        except LlmpackError as exc:
            error = exc
        engine.close()
        return pieces, error

    pieces, error = asyncio.run(scenario())
    assert "".join(pieces) == tokenizer.decode(answer_ids(tokenizer)[:2])
    assert error is not None and error.http_status == 500


def test_tokens_taken_together_keep_the_pieces_the_cli_prints(tokenizer):
    """Coalesced tokens still give one piece per token (the CLI's event boundaries), in one batch to write."""
    async def scenario():
        engine = scripted_engine(tokenizer)
        admission = Admission(engine, max_queue=4)
        generation = admit(admission, 0)
        time.sleep(0.5)  # the loop is blocked: all three tokens arrive before it takes any
        batches = [batch async for batch in generation.batches()]
        cli = list(engine.stream([1, 0, 5], 3, GREEDY3.sampling))
        engine.close()
        return batches, cli

    batches, cli = asyncio.run(scenario())
    assert batches == [cli] and len(cli) == 3


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
    assert 'llmpack_time_to_first_token_seconds_bucket{le="0.01"} 0.0' in text
    assert 'llmpack_time_to_first_token_seconds_bucket{le="0.025"} 1.0' in text
    assert 'llmpack_inter_token_latency_seconds_bucket{le="0.0025"} 2.0' in text
    assert "llmpack_inter_token_latency_seconds_count 2.0" in text


# --- an exception inside one generation, over real HTTP ---------------------------------------------


class FlakyBackend:
    """The real demo backend, except that a prompt containing 'FAIL@n' fails the step that makes its n-th token.

    No request can make the real engine fail (its inputs are validated and bounded), so the fault is
    injected here, in the test, and nowhere in the library.
    """

    def __init__(self, backend, tokenizer):
        self._backend, self._tokenizer = backend, tokenizer
        self._fail_at: dict[int, int] = {}
        self._steps: dict[int, int] = {}

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def prefill(self, slot, ids):
        found = re.search(r"FAIL@(\d)", self._tokenizer.decode(list(ids)))
        if found:
            self._fail_at[slot], self._steps[slot] = int(found.group(1)), 0
        if self._fail_at.get(slot) == 0:
            raise RuntimeError("simulated backend fault")
        return self._backend.prefill(slot, ids)

    def decode(self, slots, ids):
        for slot in slots:
            self._steps[slot] = self._steps.get(slot, 0) + 1
            if self._fail_at.get(slot) == self._steps[slot]:
                raise RuntimeError("simulated backend fault")
        return self._backend.decode(slots, ids)

    def reset(self, slot):
        self._fail_at.pop(slot, None)
        self._steps.pop(slot, None)
        self._backend.reset(slot)


@pytest.fixture(scope="module")
def flaky_server(demo_artifact):
    import uvicorn

    from llmpack.runtime.serve.server import create_app

    real = Engine.load(demo_artifact, EngineOptions(threads=1, prefix_cache_mb=0))
    engine = Engine(real.artifact, FlakyBackend(real.backend, real.tokenizer), real.tokenizer, real.system_prompt,
                    EngineOptions(prefix_cache_mb=0))  # every request reads its whole prompt: the marker is seen
    app = create_app(engine)
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
    # Greedy: the same tokens every run, so text has come before the failing step (with sampling, a run whose
    # first tokens are parts of one character has no text yet, and rightly gets a 500 JSON instead).
    body = {"prompt": "FAIL@6 later", "max_tokens": 12, "temperature": 0}
    plain = httpx.post(flaky_server + "/ai/run/demo", json=body)
    assert plain.status_code == 500 and plain.json()["errors"][0]["code"] == 5000
    streamed = httpx.post(flaky_server + "/ai/run/demo", json={**body, "stream": True})
    events, done = parse_sse(streamed.content)
    assert streamed.status_code == 200 and not done  # no [DONE]: the client can tell it is incomplete
    assert events[:-1] and all(set(e) == {"response"} for e in events[:-1]) and events[-1]["success"] is False
    metrics = httpx.get(flaky_server + "/metrics").text
    assert 'llmpack_generations_total{outcome="failed"}' in metrics and "llmpack_requests_in_flight 0" in metrics


def test_ready_only_after_the_warm_up_generation(tokenizer):
    from starlette.testclient import TestClient

    from llmpack.runtime.serve.server import create_app

    engine = scripted_engine(tokenizer)
    engine.backend.answer = [GATED] * 3  # held at the gate: the warm-up's prompt is the template, not ours
    engine.backend.decode = _gated(engine.backend)
    with TestClient(create_app(engine)) as client:
        assert client.get("/health").status_code == 200
        not_yet = client.get("/ready")
        assert not_yet.status_code == 503 and "warm-up" in not_yet.json()["reason"]
        engine.backend.gate.set()
        deadline = time.monotonic() + 10
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    engine.close()


def _gated(backend: ScriptedBackend):
    scripted = backend.decode

    def decode(slots, ids):
        backend.gate.wait(10)
        return scripted(slots, ids)
    return decode


def test_a_fault_in_the_batch_loop_itself_ends_every_request_and_turns_ready_false(tokenizer):
    """The backend's own failures end their sequences (above); a bug in the loop around them must not leave
    requests waiting forever: they end with an error, new ones are refused, and /ready says why."""
    from serving import RUN
    from starlette.testclient import TestClient

    from llmpack.runtime.serve.server import create_app

    engine = scripted_engine(tokenizer)
    with TestClient(create_app(engine)) as client:
        deadline = time.monotonic() + 10
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)

        def broken_step():
            raise RuntimeError("simulated scheduler bug")

        engine.scheduler._step = broken_step
        body = {"prompt": "x", "raw": True, "max_tokens": 3}
        failed = client.post(RUN, json=body)
        assert failed.status_code == 500 and "restart the server" in failed.json()["errors"][0]["message"]
        assert "simulated" not in failed.text
        ready = client.get("/ready")
        assert ready.status_code == 503 and "internal error" in ready.json()["reason"]
        refused = client.post(RUN, json=body)
        assert refused.status_code >= 500 and "restart the server" in refused.text
    engine.close()
