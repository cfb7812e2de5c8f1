"""Sampling: each filter and penalty on crafted logits, plus determinism per seed."""

from __future__ import annotations

import numpy as np
import pytest

from llmpack.runtime.errors import InvalidRequest
from llmpack.runtime.sampling import (
    SamplingParams,
    TokenHistory,
    apply_logit_bias,
    apply_penalties,
    draw_index,
    filter_top_k,
    filter_top_p,
    make_rng,
    nucleus_ids,
    processed_scores,
    sample_from_scores,
    sample_token,
    softmax,
    token_logprobs,
)

VOCAB = 32000


def vocab_logits(seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=VOCAB) * 3).astype(np.float32)


def kept(filtered: np.ndarray) -> set[int]:
    return set(np.flatnonzero(np.isfinite(filtered)).tolist())


def test_top_k_keeps_exactly_the_k_largest():
    logits = vocab_logits()
    for k in (1, 7, 50):
        assert kept(filter_top_k(logits, k)) == set(np.argsort(-logits)[:k].tolist())
    filtered = filter_top_k(logits, 7)
    finite = np.isfinite(filtered)
    assert np.array_equal(filtered[finite], logits[finite])


def test_top_k_with_ties_still_keeps_exactly_k():
    assert len(kept(filter_top_k(np.zeros(100, dtype=np.float32), 5))) == 5


def test_top_k_larger_than_vocab_keeps_all():
    logits = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    assert np.array_equal(filter_top_k(logits, 50), logits)


def probs_logits(probs: list[float]) -> np.ndarray:
    return np.log(np.array(probs, dtype=np.float64))


@pytest.mark.parametrize(
    ("p", "expected"),
    [
        (0.5, {0}),  # 0.5 alone reaches 0.5
        (0.51, {0, 1}),
        (0.75, {0, 1}),  # 0.5 + 0.25 reaches 0.75 exactly
        (0.8, {0, 1, 2}),
        (0.99, {0, 1, 2, 3}),
        (0.0, {0}),  # only the top token
    ],
)
def test_top_p_keeps_minimal_nucleus(p, expected):
    logits = probs_logits([0.5, 0.25, 0.15, 0.1])
    assert kept(filter_top_p(logits, p)) == expected


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0])
def test_top_p_at_or_above_one_is_disabled(p):
    logits = probs_logits([0.5, 0.25, 0.15, 0.1])
    assert filter_top_p(logits, p) is logits


def test_top_p_over_full_vocab_matches_sort_definition():
    logits = vocab_logits(3)
    for p in (0.3, 0.6, 0.9, 0.999):  # up to 0.6 the 256-id probe holds the nucleus; then full sort
        probs = softmax(logits)
        order = np.argsort(-probs, kind="stable")
        ranked = probs[order].astype(np.float64)
        before = np.cumsum(ranked) - ranked
        assert kept(filter_top_p(logits, p)) == set(order[before < p].tolist())
    assert len(nucleus_ids(softmax(logits), 0.999)) > 256


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = np.array([2.0, -2.0, 2.0, -2.0, 0.0], dtype=np.float32)
    history = TokenHistory(5, prompt_ids=[0, 1])
    history.add(4)
    out = apply_penalties(logits, SamplingParams(repetition_penalty=2.0), history)
    assert out.tolist() == [1.0, -4.0, 2.0, -2.0, 0.0]
    assert logits.tolist() == [2.0, -2.0, 2.0, -2.0, 0.0]  # input untouched


def test_frequency_and_presence_penalties_count_generated_tokens_only():
    logits = np.zeros(4, dtype=np.float32)
    history = TokenHistory(4, prompt_ids=[3])
    for token in (0, 0, 0, 1):
        history.add(token)
    out = apply_penalties(logits, SamplingParams(frequency_penalty=0.5, presence_penalty=1.0), history)
    assert out.tolist() == [-2.5, -1.5, 0.0, 0.0]


def test_no_penalty_returns_logits_unchanged():
    logits = vocab_logits()
    assert apply_penalties(logits, SamplingParams(), TokenHistory(VOCAB, [1, 2, 3])) is logits


def test_greedy_is_argmax_even_with_rng():
    logits = vocab_logits(5)
    for seed in (1, 2, 3):
        assert sample_token(logits, SamplingParams(temperature=0), make_rng(seed)) == int(np.argmax(logits))


def test_greedy_applies_penalties_first():
    logits = np.array([3.0, 2.0, 0.0], dtype=np.float32)
    history = TokenHistory(3, prompt_ids=[0])
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert sample_token(logits, params, make_rng(1), history) == 1


def draw_many(params: SamplingParams, seed: int, steps: int = 40, logits=None) -> list[int]:
    logits = vocab_logits(7) if logits is None else logits
    rng = make_rng(seed)
    return [sample_token(logits, params, rng) for _ in range(steps)]


@pytest.mark.parametrize(
    "params", [SamplingParams(), SamplingParams(top_k=40), SamplingParams(top_p=0.9, temperature=1.5)]
)
def test_same_seed_same_tokens_different_seed_differs(params):
    assert draw_many(params, 42) == draw_many(params, 42)
    assert draw_many(params, 42) != draw_many(params, 43)


def test_samples_respect_top_k_and_top_p():
    logits = vocab_logits(11)
    top5 = set(np.argsort(-logits)[:5].tolist())
    assert set(draw_many(SamplingParams(top_k=5, temperature=5), 1, 200, logits)) <= top5
    nucleus = kept(filter_top_p(logits / np.float32(1.0), 0.5))
    assert set(draw_many(SamplingParams(top_p=0.5, temperature=1.0), 1, 200, logits)) <= nucleus


def test_temperature_scales_the_distribution():
    logits = probs_logits([0.6, 0.3, 0.1]).astype(np.float32)
    counts = {}
    for temperature in (0.25, 1.0, 5.0):
        draws = draw_many(SamplingParams(temperature=temperature), 0, 3000, logits)
        counts[temperature] = np.bincount(draws, minlength=3) / 3000
    assert counts[0.25][0] > 0.9  # sharpened: (0.6^4 normalised) ≈ 0.94
    assert abs(counts[1.0][0] - 0.6) < 0.03 and abs(counts[1.0][2] - 0.1) < 0.02
    assert counts[5.0][2] > 0.25  # flattened towards uniform


def test_draw_index_never_picks_zero_weight():
    weights = np.zeros(2000, dtype=np.float32)
    weights[[3, 1500]] = 1.0
    picks = {draw_index(weights, u) for u in np.linspace(0, 0.999999999, 101)}
    assert picks == {3, 1500}
    assert draw_index(weights, np.nextafter(1.0, 0.0)) == 1500


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", 5.01),
        ("top_k", 0),
        ("top_k", 51),
        ("top_p", -0.5),
        ("top_p", 2.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", 2.1),
        ("frequency_penalty", -1),
        ("presence_penalty", 3),
        ("seed", 0),
        ("seed", 10_000_000_000),
        ("temperature", float("nan")),
    ],
)
def test_validate_names_the_field(field, value):
    with pytest.raises(InvalidRequest, match=rf"^{field}: must be"):
        SamplingParams(**{field: value}).validate()


def test_validate_accepts_the_edges():
    params = SamplingParams(temperature=5, top_k=50, top_p=2, repetition_penalty=2, frequency_penalty=2,
                            presence_penalty=2, seed=9_999_999_999)
    assert params.validate() is params
    SamplingParams(temperature=0, top_k=1, top_p=0, repetition_penalty=0.01, seed=1).validate()


def test_logit_bias_is_added_without_touching_the_logits():
    logits = np.array([1.0, 3.0, 2.0], dtype=np.float32)
    biased = apply_logit_bias(logits, ((0, 5.0), (1, -1.5)))
    assert biased.tolist() == [6.0, 1.5, 2.0] and logits.tolist() == [1.0, 3.0, 2.0]
    assert apply_logit_bias(logits, ()) is logits


def test_logit_bias_steers_greedy_and_sampled_choices():
    logits = np.array([1.0, 3.0, 2.0], dtype=np.float32)
    rng = np.random.default_rng(0)
    assert sample_token(logits, SamplingParams(temperature=0, logit_bias=((2, 100.0),)), rng) == 2
    banned = SamplingParams(temperature=1.0, logit_bias=((1, -100.0),))
    assert 1 not in {sample_token(logits, banned, rng) for _ in range(200)}


@pytest.mark.parametrize("bias", [((1, 100.5),), ((1, float("nan")),), tuple((i, 1.0) for i in range(301))])
def test_logit_bias_out_of_range_is_refused(bias):
    with pytest.raises(InvalidRequest, match="logit_bias"):
        SamplingParams(logit_bias=bias).validate()


def test_token_logprobs_are_the_log_softmax_of_the_processed_scores_over_the_temperature():
    logits = vocab_logits(3)[:50]
    params = SamplingParams(temperature=2.0, logit_bias=((7, 5.0),), top_logprobs=4)
    scores = processed_scores(logits, params)
    reported = token_logprobs(scores, params, token=7, top=4)
    z = scores.astype(np.float64) / 2.0
    expected = z - np.log(np.exp(z).sum())
    assert reported.logprob == pytest.approx(expected[7], abs=1e-9)
    assert [i for i, _ in reported.top] == np.argsort(-expected)[:4].tolist()
    assert [v for _, v in reported.top] == pytest.approx(np.sort(expected)[::-1][:4].tolist(), abs=1e-9)
    greedy = token_logprobs(logits, SamplingParams(temperature=0), token=0, top=0)
    assert greedy.top == () and greedy.logprob == pytest.approx(
        logits[0] - np.log(np.exp(logits.astype(np.float64)).sum()), abs=1e-6)


def test_top_logprobs_is_bounded():
    with pytest.raises(InvalidRequest, match="top_logprobs"):
        SamplingParams(top_logprobs=21).validate()


def test_a_repetition_penalty_at_its_open_bound_keeps_every_score_and_log_probability_finite():
    """5e-324 is in range (0, 2]: seen tokens' logits divide to infinity. Found by `make fuzz` as a 500 (a NaN log
    probability could not be written as JSON); the scores stay finite and ordered, ties share the mass."""
    import json

    params = SamplingParams(temperature=1.0, repetition_penalty=5e-324, seed=3)
    scores = processed_scores(np.array([1.0, 2.0, -3.0, 0.5], np.float32), params, TokenHistory(4, [0, 1]))
    assert np.isfinite(scores).all() and scores[0] == scores[1] > scores[3] > scores[2]
    assert sample_from_scores(scores, params, make_rng(3)) in (0, 1)
    logprobs = token_logprobs(scores, params, 1, 2)
    assert logprobs.logprob == pytest.approx(np.log(0.5)) and json.dumps(logprobs.top, allow_nan=False)


@pytest.mark.parametrize("temperature", [1e-300, 1e-40, 5e-324])
def test_a_vanishing_temperature_samples_the_top_ties_instead_of_nan(temperature):
    params = SamplingParams(temperature=temperature)
    scores = np.array([1.0, 2.0, 2.0, -3.0], np.float32)
    draws = {sample_from_scores(scores, params, make_rng(seed)) for seed in range(40)}
    assert draws == {1, 2}
