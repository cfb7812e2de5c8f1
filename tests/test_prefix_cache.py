"""Prefix caching: a prompt that begins like a kept sequence starts from a copy of its KV cache, and
every answer stays what it is without the cache."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from llmpack.runtime.artifact import open_artifact, open_backend
from llmpack.runtime.engine import Engine, EngineOptions
from llmpack.runtime.prefix_cache import PrefixCache, common_prefix
from llmpack.runtime.sampling import SamplingParams
from llmpack.runtime.serve.protocol import parse_request

PROMPT = [1] + list(range(100, 119))  # 20 tokens


def test_lookup_finds_the_longest_shared_prefix_and_never_the_last_token():
    cache = PrefixCache(budget_bytes=1000, min_tokens=3)
    cache.keep([1, 2, 3, 4, 5, 6], "six", 60)
    cache.keep([1, 2, 9, 9], "other", 40)
    kept, length = cache.lookup([1, 2, 3, 4, 7, 7])
    assert (kept.kv, length) == ("six", 4)
    kept, length = cache.lookup([1, 2, 3, 4, 5, 6])  # the whole kept sequence: all but the last token
    assert (kept.kv, length) == ("six", 5)
    assert cache.lookup([1, 2, 8, 8]) is None  # 2 shared tokens: under min_tokens
    assert (cache.hits, cache.reused_tokens) == (2, 9)


def test_keep_drops_what_the_new_sequence_covers_and_evicts_the_least_recently_used():
    cache = PrefixCache(budget_bytes=100, min_tokens=2)
    cache.keep([1, 2, 3], "prompt", 30)
    cache.keep([1, 2, 3, 4, 5], "prompt+answer", 50)  # covers the prompt: one entry, 50 bytes
    assert len(cache) == 1 and cache.nbytes == 50
    assert not cache.worth_keeping([1, 2, 3, 4], 40)  # already held in full
    assert not cache.worth_keeping([7, 8, 9], 51)  # more than half the budget
    cache.keep([7, 8, 9], "b", 40)
    cache.lookup([1, 2, 3, 4, 5, 6])  # the first one is now the most recently used
    cache.keep([5, 6, 7], "c", 40)  # 130 > 100: the least recently used ("b") goes
    assert {kept.kv for kept, _ in filter(None, (cache.lookup(p) for p in ([1, 2, 3, 9], [5, 6, 7, 9])))} == \
        {"prompt+answer", "c"}
    assert cache.lookup([7, 8, 9, 9]) is None and cache.nbytes == 90


def test_at_most_max_kept_sequences_whatever_the_bytes():
    cache = PrefixCache(budget_bytes=10**9, min_tokens=2, max_kept=3)
    for first in range(5):
        cache.keep([first, 1, 2, 3], first, 1)
    assert len(cache) == 3 and cache.nbytes == 3
    assert cache.lookup([0, 1, 2, 3, 4]) is None and cache.lookup([4, 1, 2, 3, 4])[0].kv == 4


def test_common_prefix():
    a = np.array([1, 2, 3])
    assert [common_prefix(a, np.array(b)) for b in ([1, 2, 3, 4], [1, 5], [], [2])] == [3, 1, 0, 0]


@pytest.mark.parametrize("which", ["demo_artifact", "fused_tiny", "fused_stories"])
def test_a_slot_started_from_a_copy_continues_exactly_like_the_original(request, which):
    backend = open_backend(open_artifact(request.getfixturevalue(which)), "cpu", threads=1, max_batch=3)
    want = backend.prefill(0, PROMPT)
    backend.prefill(2, [1, 7, 7])  # another sequence in the batch, of another length
    kv = backend.export_kv(0, 12)
    assert sum(part.nbytes for part in kv) == backend.kv_bytes(12)
    backend.import_kv(1, kv, 12)
    assert backend.cached_tokens(1) == 12
    np.testing.assert_allclose(backend.prefill(1, PROMPT[12:]), want, rtol=1e-4, atol=1e-4)
    logits = backend.decode([0, 1, 2], [42, 42, 42])
    np.testing.assert_allclose(logits[1], logits[0], rtol=1e-4, atol=1e-4)
    assert not np.allclose(logits[2], logits[0], atol=1e-3)  # the check can tell sequences apart


def _answers(engine: Engine, bodies: list[dict]) -> list[str]:
    return [engine.complete(parse_request(body)).text for body in bodies]


def _chat(turns: list[str]) -> list[dict]:
    """Bodies of a growing conversation: each turn resends the earlier ones with a fixed answer."""
    bodies, messages = [], []
    for turn in turns:
        messages = [*messages, {"role": "user", "content": turn}]
        bodies.append({"messages": messages, "max_tokens": 12, "temperature": 0})
        messages = [*messages, {"role": "assistant", "content": "Yes, and then the cat sat down."}]
    return bodies


@pytest.mark.parametrize("which", ["stories_artifact", "fused_stories"])
def test_answers_with_the_prefix_cache_equal_answers_without(request, which):
    artifact = request.getfixturevalue(which)
    bodies = _chat(["Tell me a story.", "What happened next?", "And then?"])
    story = "Once upon a time there was a girl named Sue who"
    bodies += [{"prompt": story, "raw": True, "max_tokens": 16, "temperature": 0}] * 2
    bodies += [{"prompt": story + " liked dogs", "raw": True, "max_tokens": 16, "temperature": 0.8, "seed": 5}]
    without = Engine.load(artifact, EngineOptions(max_batch=4, prefix_cache_mb=0))
    assert without.prefix_cache is None
    want = _answers(without, bodies)
    without.close()
    engine = Engine.load(artifact, EngineOptions(max_batch=4, prefix_cache_mb=64))
    assert _answers(engine, bodies) == want
    cache = engine.prefix_cache
    # every chat turn after the first, the repeated prompt and its longer variant started from a copy
    assert cache.hits >= 4 and cache.reused_tokens > 60
    with ThreadPoolExecutor(max_workers=4) as pool:  # and concurrently, copies made while others decode
        assert list(pool.map(lambda body: engine.complete(parse_request(body)).text, bodies)) == want
    engine.close()


def test_a_failed_copy_falls_back_to_reading_the_whole_prompt(fused_stories, caplog):
    engine = Engine.load(fused_stories, EngineOptions(max_batch=2, prefix_cache_mb=64))
    body = {"prompt": "Once upon a time there was a girl named Sue who", "raw": True, "max_tokens": 8,
            "temperature": 0}
    want = engine.complete(parse_request(body)).text

    def broken(slot, kv, length):
        raise MemoryError("no room for the copy")

    engine.backend.import_kv = broken
    assert engine.complete(parse_request(body)).text == want
    assert "reading the prompt in full" in caplog.text
    engine.close()


def test_a_prompt_cancelled_while_being_read_leaves_a_prefix_that_gives_the_same_answer(fused_stories):
    prompt = [1] + list(range(40, 440))  # 401 tokens, read 8 a step while another sequence decodes
    greedy = SamplingParams(temperature=0)
    alone = Engine.load(fused_stories, EngineOptions(max_batch=2, prefix_cache_mb=0))
    want = list(alone.generate_ids(prompt, 12, greedy, stop_ids=()))
    alone.close()
    engine = Engine.load(fused_stories, EngineOptions(max_batch=2, prefill_chunk=8, prefix_cache_mb=64))
    runner = iter(engine.generate_ids([1, 7, 8], 2000, greedy, stop_ids=()))
    next(runner)  # decoding in slot 0: the prompt below is read a chunk per step
    victim = engine.generate_ids(prompt, 12, greedy, stop_ids=())
    deadline = time.monotonic() + 30
    while engine.backend.cached_tokens(1) < 16 and time.monotonic() < deadline:
        time.sleep(0.001)
    victim.cancel()
    while engine.scheduler.active > 1 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert list(victim) == [] and victim.finish_reason == "cancelled"
    kept = [len(k.ids) for k in engine.prefix_cache._kept.values() if list(k.ids) == prompt[: len(k.ids)]]
    assert kept and 16 <= max(kept) < len(prompt)  # the part read before the cancel, not more
    assert list(engine.generate_ids(prompt, 12, greedy, stop_ids=())) == want
    assert engine.prefix_cache.hits >= 1
    runner.close()
    engine.close()
