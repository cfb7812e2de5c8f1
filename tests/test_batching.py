"""Continuous batching: answers under concurrency equal the same requests served alone."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from llmpack.runtime.batch_scheduler import PrefillPacer
from llmpack.runtime.engine import Engine, EngineOptions
from llmpack.runtime.sampling import SamplingParams
from llmpack.runtime.serve.protocol import parse_request

STORY_PROMPTS = ["Once upon a time", "Tom had a red ball.", "The sun was hot and", "Lily said \"Olé!\" to",
                 "One day, a big dog", "Sam and Mia", "The bird", "A little girl named Sue went to the park and"]


def _requests(prompts, raw: bool):
    bodies = []
    for i in range(16):
        body = {"prompt": prompts[i % len(prompts)] + (" again" if i >= len(prompts) else ""), "raw": raw,
                "max_tokens": 20 + 9 * (i % 5), "stream": i % 2 == 0}
        body |= {"temperature": 0} if i % 4 != 3 else {"temperature": 0.9, "seed": 100 + i, "top_k": 20}
        bodies.append(body)
    return bodies


def _answer(engine: Engine, body: dict) -> str:
    request = parse_request(body)
    if request.stream:
        return "".join(piece for piece in engine.stream_request(request))
    return engine.complete(request).text


@pytest.mark.parametrize("which", ["stories", "demo"])
def test_16_concurrent_requests_equal_served_alone(request, which):
    artifact = request.getfixturevalue(f"{which}_artifact")
    engine = Engine.load(artifact, EngineOptions(max_batch=8, prefill_chunk=16))
    bodies = _requests(STORY_PROMPTS, raw=which == "stories")
    alone = [_answer(engine, body) for body in bodies]
    with ThreadPoolExecutor(max_workers=16) as pool:
        together = list(pool.map(lambda body: _answer(engine, body), bodies))
    assert together == alone
    assert engine.scheduler.active == 0 and engine.scheduler.queue_depth == 0
    engine.close()


def test_batched_decode_logits_match_single_sequence_logits(demo_artifact):
    engine = Engine.load(demo_artifact, EngineOptions(max_batch=3))
    backend = engine.backend
    prompts = [[1, 5, 6, 7], [1, 9], [1, 20, 21, 22, 23, 24, 25]]
    single = []
    for prompt in prompts:
        backend.prefill(0, prompt)
        single.append(backend.decode([0], [42])[0].copy())
        backend.reset(0)
    for slot, prompt in enumerate(prompts):
        backend.prefill(slot, prompt)
    batched = backend.decode([0, 1, 2], [42, 42, 42])
    for row in range(3):
        np.testing.assert_allclose(batched[row], single[row], rtol=1e-5, atol=1e-5)
    assert [backend.cached_tokens(s) for s in range(3)] == [5, 3, 8]
    # the set of slots changes: the batch is unpacked and repacked without slot 1
    pair = backend.decode([0, 2], [43, 43])
    for row, prompt in zip((0, 1), (prompts[0], prompts[2])):
        backend.reset(1)
        backend.prefill(1, prompt + [42])
        np.testing.assert_allclose(pair[row], backend.decode([1], [43])[0], rtol=1e-5, atol=1e-5)
    engine.close()


def test_cancelled_stream_frees_its_slot_at_once(demo_artifact):
    engine = Engine.load(demo_artifact, EngineOptions(max_batch=1))
    stream = engine.generate_ids([1, 5, 6], 2000, SamplingParams(temperature=0), stop_ids=())
    iterator = iter(stream)
    next(iterator)
    iterator.close()  # the consumer goes away
    quick = engine.generate_ids([1, 5, 6], 3, SamplingParams(temperature=0), stop_ids=())
    started = time.monotonic()
    assert len(list(quick)) == 3 and time.monotonic() - started < 5
    assert stream.finish_reason == "cancelled"
    engine.close()


def test_long_prefill_does_not_stall_running_decodes(demo_artifact):
    """While a 2400-token prompt is read in chunks, an already running stream keeps getting tokens."""
    engine = Engine.load(demo_artifact, EngineOptions(max_batch=2, prefill_chunk=64))
    greedy = SamplingParams(temperature=0)
    runner = engine.generate_ids([1, 5, 6], 400, greedy, stop_ids=())
    arrivals: list[float] = []
    first_tokens = threading.Event()

    def consume():
        for _ in runner:
            arrivals.append(time.monotonic())
            if len(arrivals) == 5:
                first_tokens.set()

    worker = threading.Thread(target=consume)
    worker.start()
    first_tokens.wait(30)
    long_start = time.monotonic()
    long_stream = engine.generate_ids([1] + [7] * 2399, 1, greedy, stop_ids=())
    list(long_stream)
    long_done = time.monotonic()
    worker.join(60)
    during = [t for t in arrivals if long_start <= t <= long_done]
    assert len(during) >= 10, f"only {len(during)} tokens arrived while the long prompt was prefilled"
    engine.close()


def test_requests_queue_fairly_beyond_max_batch(stories_artifact):
    engine = Engine.load(stories_artifact, EngineOptions(max_batch=2))
    greedy = SamplingParams(temperature=0)
    streams = [engine.generate_ids([1, 400 + i], 30, greedy, stop_ids=()) for i in range(6)]
    assert engine.scheduler.queue_depth + engine.scheduler.active <= 6
    with ThreadPoolExecutor(max_workers=6) as pool:
        lengths = list(pool.map(lambda s: len(list(s)), streams))
    assert lengths == [30] * 6
    engine.close()


def test_leaving_keeps_a_dead_row_and_joining_restacks(demo_artifact):
    """A reset slot's row stays (dead) without any copy; later steps of the others stay exact."""
    engine = Engine.load(demo_artifact, EngineOptions(max_batch=3))
    backend = engine.backend
    prompts = {0: [1, 5, 6, 7], 1: [1, 9], 2: [1, 20, 21, 22, 23]}

    def alone(prompt, tokens):
        backend.reset(1)
        backend.prefill(1, prompt)
        for token in tokens[:-1]:
            backend.decode([1], [token])
        logits = backend.decode([1], [tokens[-1]])[0].copy()
        backend.reset(1)
        return logits

    for slot, prompt in prompts.items():
        backend.prefill(slot, prompt)
    backend.decode([0, 1, 2], [42, 42, 42])
    backend.reset(1)
    batch = backend._batch
    after_leave = backend.decode([0, 2], [43, 43])
    assert backend._batch is batch and batch.dead == 1, "a leave must not restack"
    backend.prefill(1, [1, 30, 31])  # a newcomer in the freed slot joins: one restack, dead row dropped
    joined = backend.decode([0, 1, 2], [44, 50, 44])
    assert backend._batch is not batch and backend._batch.dead == 0
    reference = {0: alone(prompts[0], [42, 43]), 2: alone(prompts[2], [42, 43])}
    for row, slot in enumerate((0, 2)):
        np.testing.assert_allclose(after_leave[row], reference[slot], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(joined[0], alone(prompts[0], [42, 43, 44]), rtol=1e-5, atol=1e-5)
    engine.close()


def test_prefill_pacer_reads_whole_chunks_alone_and_one_decode_step_of_tokens_while_others_decode():
    pacer = PrefillPacer(chunk=128, floor=16)
    assert pacer.budget(decoding=0) == 128
    assert pacer.budget(decoding=3) == 16  # nothing measured yet: a cautious chunk
    pacer.observe_decode(3, 0.080)
    pacer.observe_prefill(128, 0.022 + 0.0014 * 128)
    assert pacer.budget(decoding=0) == 128
    # A chunk costs 22 ms + 1.4 ms/token here; sizing by time/token converges on the chunk that
    # costs one 80 ms decode step: (80 - 22) / 1.4 = 41 tokens.
    for _ in range(30):
        tokens = pacer.budget(decoding=3)
        pacer.observe_prefill(tokens, 0.022 + 0.0014 * tokens)
    assert abs(pacer.budget(decoding=3) - 41) <= 2
    for _ in range(30):
        pacer.observe_decode(3, 0.001)  # a decode step cheaper than any chunk: never below the floor
    assert pacer.budget(decoding=3) == 16
    assert PrefillPacer(chunk=8, floor=16).budget(decoding=1) == 8


def test_prefill_pacer_keeps_decode_costs_per_batch_size():
    pacer = PrefillPacer(chunk=128, floor=4)
    pacer.observe_prefill(10, 0.010)  # 1 ms per token
    pacer.observe_decode(1, 0.020)
    pacer.observe_decode(8, 0.040)
    assert pacer.budget(decoding=1) == 20 and pacer.budget(decoding=8) == 40
    assert pacer.budget(decoding=7) == 40 and pacer.budget(decoding=2) == 20  # the nearest batch measured


class TimedFakeBackend:
    """Costs like a CPU model (1 ms per prompt token, 20 ms per decode step); always predicts token 5."""

    name, context_length, vocab_size, max_batch = "fake", 4096, 16, 2

    def __init__(self):
        self.lengths = [0, 0]
        self.chunks: list[tuple[int, bool]] = []  # (tokens, was another slot holding a sequence)

    def _logits(self, rows: int) -> np.ndarray:
        logits = np.zeros((rows, self.vocab_size), np.float32)
        logits[:, 5] = 1.0
        return logits

    def cached_tokens(self, slot: int) -> int:
        return self.lengths[slot]

    def prefill(self, slot, token_ids):
        self.chunks.append((len(token_ids), self.lengths[1 - slot] > 0))
        time.sleep(0.001 * len(token_ids))
        self.lengths[slot] += len(token_ids)
        return self._logits(1)[0]

    def decode(self, slots, token_ids):
        time.sleep(0.02)
        for slot in slots:
            self.lengths[slot] += 1
        return self._logits(len(slots))

    def reset(self, slot):
        self.lengths[slot] = 0


def test_a_prompt_joining_running_decodes_is_read_in_chunks_of_about_one_decode_step():
    from llmpack.runtime.batch_scheduler import BatchScheduler
    from llmpack.runtime.generate import TokenStream

    backend = TimedFakeBackend()
    scheduler = BatchScheduler(backend, prefill_chunk=128)
    greedy = SamplingParams(temperature=0)
    running_tokens = TokenStream([1] + [3] * 149)
    scheduler.submit(running_tokens, 300, greedy, stop_ids=())
    running = iter(running_tokens)
    for _ in range(5):
        next(running)  # decoding, with its step time measured
    joining = TokenStream([1] + [4] * 299)
    scheduler.submit(joining, 1, greedy, stop_ids=())
    assert list(joining) == [5]
    alone, *joined = backend.chunks
    assert alone == (128, False)  # nobody decoding: a whole chunk
    sizes = [tokens for tokens, others in joined[:-1] if others]
    # 20 ms steps at ~1 ms per token: chunks of about 20 tokens (the floor is 16), not 128
    assert sizes and all(16 <= size <= 40 for size in sizes), backend.chunks
    running.close()
    scheduler.close()
