"""Speculative decoding in the backends and the engine: one step checks k tokens and the rejected ones leave
the cache (both CPU graphs), and answers with speculation on are those without it — greedy, seeded, stop ids,
max_tokens edges, batching, streamed UTF-8, the sampled distribution — and /metrics counts it. The pure halves
(proposer, acceptance, cost model): test_speculation.py."""

from __future__ import annotations

import time

import numpy as np
import pytest

from llmpack.runtime.sampling import SamplingParams

# --- the backend half: one step checks k tokens, and the rejected ones leave the cache ----------------------


def open_cpu(artifact, max_batch: int = 2):
    from llmpack.runtime.artifact import open_artifact, open_backend

    return open_backend(open_artifact(artifact), "cpu", max_batch=max_batch)


CPU_ARTIFACTS = ["fused_stories", "fused_tiny", "stories_artifact", "demo_artifact"]  # ort-fused, then standard


@pytest.mark.parametrize("which", CPU_ARTIFACTS)
def test_score_gives_every_fed_positions_logits_as_decoding_them_one_by_one(request, which):
    backend = open_cpu(request.getfixturevalue(which))
    prompt, fed = [1, 45, 67, 89, 23, 11], [34, 56, 78, 90]
    backend.prefill(0, prompt)
    scored = backend.score(0, fed)
    backend.prefill(1, prompt)
    one_by_one = np.stack([backend.decode([1], [token])[0] for token in fed])
    assert scored.shape == (len(fed), backend.vocab_size)
    np.testing.assert_allclose(scored, one_by_one, rtol=1e-4, atol=1e-4)
    assert (scored.argmax(-1) == one_by_one.argmax(-1)).all()
    assert backend.cached_tokens(0) == backend.cached_tokens(1) == len(prompt) + len(fed)


@pytest.mark.parametrize("which", ["fused_tiny", "demo_artifact"])
def test_truncating_the_rejected_tokens_leaves_the_cache_of_a_sequence_that_never_saw_them(request, which):
    """ort-fused: the in-place cache's length goes back; standard graph: the present is cut."""
    backend = open_cpu(request.getfixturevalue(which))
    prompt = [1, 5, 9, 13, 17]
    backend.prefill(0, prompt)
    backend.score(0, [21, 25, 29, 33])  # 21 and 25 accepted, 29 and 33 rejected
    backend.truncate(0, len(prompt) + 2)
    backend.prefill(1, prompt)
    backend.decode([1], [21])
    backend.decode([1], [25])
    length = len(prompt) + 2
    np.testing.assert_allclose(backend.export_kv(0, length), backend.export_kv(1, length), rtol=1e-4, atol=1e-5)
    after_rollback, never_saw = backend.decode([0, 1], [40, 40])
    np.testing.assert_allclose(after_rollback, never_saw, rtol=1e-4, atol=1e-4)
    with pytest.raises(Exception, match="cannot keep"):
        backend.truncate(0, 99)


def test_a_mixed_step_after_speculation_still_works(fused_tiny):
    """mixed.onnx has no num_logits input: the rewrite drops it, and a mixed step runs beside scored slots."""
    backend = open_cpu(fused_tiny, max_batch=3)
    assert backend.can_score and backend.can_mix
    backend.prefill(0, [1, 2, 3])
    backend.score(0, [4, 5])
    logits, chunk_logits = backend.decode_and_prefill([0], [6], 1, [1, 7, 8])
    assert logits.shape == (1, backend.vocab_size) and chunk_logits.shape == (backend.vocab_size,)


# --- the engine: speculation on gives the same answers ---------------------------------------------------

STORY_PROMPTS = ["Once upon a time", "Lily and Ben went to the park. Lily and Ben", "The cat sat on the mat. The cat",
                 "One day, a little girl named Lily found a big red ball. Lily loved the big red ball. One day,",
                 "Tom had a toy car. Tom"]


def engine(artifact, speculate: str, max_batch: int = 1):
    """The engine, with its speculation cost model pinned (a check costs one decode step): which steps
    speculate then depends on the text alone, not on this machine's timings (tested on their own below)."""
    from llmpack.runtime.engine import Engine, EngineOptions

    loaded = Engine.load(artifact, EngineOptions(speculate=speculate, max_batch=max_batch, prefix_cache_mb=0))
    loaded.scheduler._relative_check_cost = lambda k, tokens: 1.0
    return loaded


def answers(eng, prompts, max_tokens: int, sampling) -> list[list[int]]:
    out = []
    for prompt in prompts:
        ids = [eng.tokenizer.bos_id, *eng.tokenizer.encode(prompt)]
        out.append(list(eng.generate_ids(ids, max_tokens, sampling)))
    return out


@pytest.mark.parametrize("max_tokens", [1, 2, 7, 120])
@pytest.mark.parametrize("which", ["fused_stories", "stories_artifact"])
def test_greedy_with_speculation_is_token_identical_on_stories260k(request, which, max_tokens):
    greedy, artifact = SamplingParams(temperature=0), request.getfixturevalue(which)
    off, on = engine(artifact, "off"), engine(artifact, "ngram")
    try:
        assert answers(on, STORY_PROMPTS, max_tokens, greedy) == answers(off, STORY_PROMPTS, max_tokens, greedy)
        if max_tokens == 120:  # the stories repeat names and phrases: proposals were made and kept
            assert on.scheduler.accepted > 20 and on.scheduler.proposed >= on.scheduler.accepted
    finally:
        off.close()
        on.close()


def test_stop_ids_end_a_speculated_answer_where_they_would_without_it(fused_stories):
    greedy = SamplingParams(temperature=0)
    off, on = engine(fused_stories, "off"), engine(fused_stories, "ngram")
    try:
        plain = answers(off, STORY_PROMPTS[1:2], 120, greedy)[0]
        stop = plain[40]  # a token the answer reaches after proposals have been checked
        ids = [off.tokenizer.bos_id, *off.tokenizer.encode(STORY_PROMPTS[1])]
        with_stop = [list(e.generate_ids(ids, 120, greedy, stop_ids=[stop])) for e in (off, on)]
        assert with_stop[0] == with_stop[1] == plain[: plain.index(stop)]
    finally:
        off.close()
        on.close()


def test_speculation_at_batch_one_gives_what_batched_sequences_give(fused_stories):
    """Four at once decode batched (speculation backs off above batch 1): the same answers as one by one."""
    from concurrent.futures import ThreadPoolExecutor

    greedy = SamplingParams(temperature=0)
    alone, batched = engine(fused_stories, "ngram"), engine(fused_stories, "ngram", max_batch=4)
    try:
        expected = answers(alone, STORY_PROMPTS[:4], 60, greedy)
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda p: answers(batched, [p], 60, greedy)[0], STORY_PROMPTS[:4]))
        assert got == expected
    finally:
        alone.close()
        batched.close()


@pytest.mark.parametrize("sampling", [
    SamplingParams(temperature=0.8, top_k=20, seed=1234),
    SamplingParams(temperature=1.0, top_p=0.9, repetition_penalty=1.2, seed=77),
    SamplingParams(temperature=0.6, frequency_penalty=0.5, presence_penalty=0.3, seed=5),
])
def test_seeded_sampled_answers_are_token_identical_with_speculation(fused_stories, sampling):
    """Each checked position draws its token as plain decoding does (one uniform from the sequence's own
    generator, penalties with the accepted tokens in the history), so the seed alone decides the answer —
    not whether, or how much, the engine chose to speculate."""
    off, on = engine(fused_stories, "off"), engine(fused_stories, "ngram")
    try:
        assert answers(on, STORY_PROMPTS, 100, sampling) == answers(off, STORY_PROMPTS, 100, sampling)
        assert on.scheduler.accepted > 0
    finally:
        off.close()
        on.close()


class MarkovBackend:
    """Logits that depend on the last token only (a Markov chain mostly walking 0→1→…→5→0), with the
    Speculation capability: the n-gram proposer guesses well, and every distribution is known."""

    name, context_length, vocab_size, max_batch, can_score = "markov", 256, 6, 1, True

    def __init__(self, score_seconds: float = 0.0):
        self.score_seconds = score_seconds
        chain = np.full((6, 6), 0.06)
        chain[np.arange(6), (np.arange(6) + 1) % 6] = 0.7  # i → i + 1 with probability 0.7
        self.table = np.log(chain).astype(np.float32)
        self.tokens: list[int] = []

    def cached_tokens(self, slot):
        return len(self.tokens)

    def prefill(self, slot, ids):
        self.tokens += list(ids)
        return self.table[ids[-1]].copy()

    def decode(self, slots, ids):
        self.tokens += list(ids)
        return self.table[list(ids)].copy()

    def score(self, slot, ids):
        time.sleep(self.score_seconds)
        self.tokens += list(ids)
        return self.table[list(ids)].copy()

    def truncate(self, slot, length):
        assert 0 < length <= len(self.tokens)
        del self.tokens[length:]

    def reset(self, slot):
        self.tokens = []


class CycleBackend(MarkovBackend):
    """Greedy walks a fixed cycle of token ids (each id's logits peak at the next one): the text repeats, so
    proposals are made and accepted in bursts of several tokens."""

    def __init__(self, cycle: list[int], vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.table = np.zeros((vocab_size, vocab_size), np.float32)
        for token, following in zip(cycle, [*cycle[1:], cycle[0]]):
            self.table[token, following] = 5.0


def test_streamed_text_with_speculation_splits_no_character(stories_tokenizer):
    """stories260k's tokenizer spells ☕ and é as byte tokens; checks that accept several at once still stream
    the same whole-character pieces as plain decoding."""
    from llmpack.runtime.batch_scheduler import BatchScheduler
    from llmpack.runtime.generate import TextStream, TokenStream

    cycle = stories_tokenizer.encode("☕é")
    assert len(set(cycle)) == len(cycle) >= 5  # distinct byte tokens: the next one follows from the last alone
    pieces = {}
    for speculate in (False, True):
        scheduler = BatchScheduler(CycleBackend(cycle, 512), max_proposed=4 if speculate else 0)
        scheduler._relative_check_cost = lambda k, tokens: 1.0
        try:
            tokens = TokenStream([1, *cycle, *cycle])
            scheduler.submit(tokens, 60, SamplingParams(temperature=0), stop_ids=[])
            pieces[speculate] = list(TextStream(tokens, stories_tokenizer))
            assert scheduler.accepted > 20 if speculate else scheduler.speculation is None
        finally:
            scheduler.close()
    assert pieces[True] == pieces[False]
    assert "☕" in "".join(pieces[True]) and not any("\ufffd" in piece for piece in pieces[True])


def test_sampled_answers_follow_the_same_distribution_with_and_without_speculation():
    """Many seeds over a cyclic prompt (proposals at nearly every step): the 4-token answers' counts with
    speculation and without come from one distribution (chi-square homogeneity, fixed seeds: deterministic)."""
    from llmpack.runtime.batch_scheduler import BatchScheduler
    from llmpack.runtime.generate import TokenStream

    counts: dict[bool, dict[tuple, int]] = {False: {}, True: {}}
    for speculate in counts:
        scheduler = BatchScheduler(MarkovBackend(), max_proposed=4 if speculate else 0)
        scheduler._relative_check_cost = lambda k, tokens: 1.0  # which steps speculate: the text's choice, not timing's
        try:
            for seed in range(1, 1501):
                tokens = TokenStream([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0])
                scheduler.submit(tokens, 4, SamplingParams(temperature=1.0, top_k=4, seed=seed), stop_ids=[])
                answer = tuple(tokens)
                counts[speculate][answer] = counts[speculate].get(answer, 0) + 1
            assert scheduler.proposed > 1500 if speculate else scheduler.speculation is None
        finally:
            scheduler.close()
    outcomes = sorted(set(counts[False]) | set(counts[True]))
    table = np.array([[counts[m].get(o, 0) for o in outcomes] for m in counts], dtype=np.float64)
    table = table[:, table.sum(axis=0) >= 10]  # the rare outcomes' cells left out of the test
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    statistic, freedom = float(((table - expected) ** 2 / expected).sum()), table.shape[1] - 1
    # chi-square 0.999 quantile ≈ freedom + 3.09·sqrt(2·freedom) + 5 (Wilson–Hilferty, rounded up)
    assert freedom >= 5 and statistic < freedom + 3.09 * (2 * freedom) ** 0.5 + 5, (statistic, freedom)


def test_speculation_stops_where_the_measured_check_costs_more_than_it_saves():
    """A backend whose checking step takes 20 ms against a near-free decode step: after the first checks are
    measured the cost model stops proposing, and answers stay those of plain decoding."""
    from llmpack.runtime.batch_scheduler import BatchScheduler
    from llmpack.runtime.generate import TokenStream

    greedy, prompt = SamplingParams(temperature=0), [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0]
    expected = TokenStream(prompt)
    plain = BatchScheduler(MarkovBackend())
    plain.submit(expected, 60, greedy, stop_ids=[])
    slow = BatchScheduler(MarkovBackend(score_seconds=0.02), max_proposed=4)
    try:
        answer = TokenStream(prompt)
        slow.submit(answer, 60, greedy, stop_ids=[])
        assert list(answer) == list(expected)
        # A few checks until the median of MIN_SAMPLES says it: k = 2, 3, then 4 as every proposal is kept
        # (2 + 3 + 3 x 4 = 17), wider ones bounded by the narrower; then plain decode steps only (never stopping:
        # over 40 of the 60 tokens would be proposed).
        assert 0 < slow.proposed <= 20
    finally:
        plain.close()
        slow.close()


def test_the_server_speculates_on_request_and_counts_it_on_metrics(fused_stories, tmp_path):
    """`llm-serve run --speculate ngram`: the same greedy answer as without it, and /metrics counts the tokens
    proposed and accepted (the server's own cost model decides how many: the counters only need to move)."""
    import httpx
    from serving import AUTH, GREEDY, RUN, SERVER_API_KEY, ServerProcess

    body = {"prompt": STORY_PROMPTS[3], "raw": True, **GREEDY, "max_tokens": 120}
    texts = {}
    for mode in ("off", "ngram"):
        server = ServerProcess(fused_stories, tmp_path / f"{mode}.log", "--speculate", mode, "--prefix-cache-mb", "0",
                               env={"LLMPACK_API_KEY": SERVER_API_KEY})
        try:
            with httpx.Client(base_url=server.base, headers=AUTH, timeout=60) as client:
                texts[mode] = [client.post(RUN, json=body).json()["response"] for _ in range(3)]
                metrics = client.get("/metrics").text
        finally:
            assert server.stop() == 0, server.log()
        counted = "llmpack_speculated_tokens_total" in metrics
        assert counted == (mode == "ngram"), metrics
    assert texts["ngram"] == texts["off"]
    proposed = next(float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith("llmpack_speculated_tokens_total "))
    assert proposed > 0


class RecordingCycleBackend(CycleBackend):
    """A CycleBackend that records how many tokens each check fed."""

    def __init__(self, cycle: list[int], vocab_size: int):
        super().__init__(cycle, vocab_size)
        self.fed: list[int] = []

    def score(self, slot, ids):
        self.fed.append(len(ids))
        return super().score(slot, ids)


@pytest.mark.parametrize("max_proposed", [1, 2, 8])
def test_speculate_max_bounds_every_check_and_the_answer_does_not_move(max_proposed):
    """--speculate-max: a text that repeats would take as many as allowed; no check feeds more than the pending
    token and max_proposed proposals, the widest allowed is used, and the answer is plain decoding's."""
    from llmpack.runtime.batch_scheduler import BatchScheduler
    from llmpack.runtime.generate import TokenStream

    cycle = [3, 7, 11, 5, 9, 13, 4, 8, 12, 6, 10, 14]  # longer than any check: the lookup can offer 11
    answers = {}
    for proposed in (0, max_proposed):
        backend = RecordingCycleBackend(cycle, 16)
        scheduler = BatchScheduler(backend, max_proposed=proposed)
        scheduler._relative_check_cost = lambda k, tokens: 1.0  # every k costs a plain step: the widest wins
        try:
            tokens = TokenStream([1, *cycle, *cycle])
            scheduler.submit(tokens, 60, SamplingParams(temperature=0), stop_ids=[])
            answers[proposed] = list(tokens)
        finally:
            scheduler.close()
        if proposed:
            assert backend.fed and max(backend.fed) == max_proposed + 1
    assert answers[max_proposed] == answers[0] and len(answers[0]) == 60


def test_a_new_sequence_starts_from_the_schedulers_acceptance(monkeypatch):
    """The scheduler hands each new sequence the acceptance its checks have seen lately (AcceptancePrior)."""
    from llmpack.runtime.batch_scheduler import BatchScheduler
    from llmpack.runtime.generate import SequenceState, TokenStream

    seen, speculate = [], SequenceState.speculate

    def recorded(self, max_proposed, rate):
        seen.append((max_proposed, rate))
        speculate(self, max_proposed, rate)

    monkeypatch.setattr(SequenceState, "speculate", recorded)
    scheduler = BatchScheduler(MarkovBackend(), max_proposed=3)
    try:
        scheduler.acceptance.rate = 0.42
        tokens = TokenStream([1, 2, 3])
        scheduler.submit(tokens, 8, SamplingParams(temperature=0), stop_ids=[])
        assert len(list(tokens)) == 8
    finally:
        scheduler.close()
    assert seen == [(3, 0.42)]
