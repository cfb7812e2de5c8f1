"""Speculative decoding's pure halves (runtime/speculation.py): prompt-lookup proposals against a brute-force
search, and acceptance that keeps the target distribution exactly (chi-square on fixed seeds: deterministic,
and shown to reject the classic wrong rule), greedy acceptance, the adaptive proposal length and the measured
check costs. The backends' checks and the engine's answers: test_speculation_engine.py."""

from __future__ import annotations

import numpy as np
import pytest

from llmpack.runtime.sampling import SamplingParams, candidate_weights
from llmpack.runtime.speculation import (
    AcceptancePrior,
    CheckCosts,
    NgramProposer,
    ProposalLength,
    accept_token,
    best_k,
    expected_tokens,
    greedy_choices,
)

CHI2_999 = {3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}  # chi-square quantile 0.999 by degrees of freedom


def brute_force_proposal(tokens: list[int], k: int, max_n: int, min_n: int) -> list[int]:
    for n in range(min(max_n, len(tokens)), min_n - 1, -1):
        suffix = tokens[len(tokens) - n:]
        for end in range(len(tokens) - 1, n - 1, -1):  # an occurrence ending at `end` has a follower
            if tokens[end - n:end] == suffix:
                return tokens[end:end + k]
    return []


@pytest.mark.parametrize("seed", range(20))
def test_ngram_proposals_equal_a_brute_force_search(seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 4, int(rng.integers(1, 80))).tolist()  # a tiny vocabulary: many repeats
    proposer = NgramProposer(max_n=4, min_n=2)
    for length in range(1, len(tokens) + 1):
        proposer.add(tokens[length - 1])
        for k in (1, 3, 5):
            assert proposer.propose(k) == brute_force_proposal(tokens[:length], k, 4, 2), (tokens[:length], k)


def test_a_repeated_phrase_is_proposed_from_the_prompt():
    text = [5, 6, 7, 8, 9, 1, 2, 5, 6, 7]
    assert NgramProposer().extend(text).propose(3) == [8, 9, 1]
    assert NgramProposer().extend([1, 2, 3]).propose(4) == []


def target(scores: np.ndarray, params: SamplingParams) -> np.ndarray:
    ids, weights = candidate_weights(scores, params)
    p = np.zeros(scores.shape[-1])
    p[np.arange(scores.shape[-1]) if ids is None else ids] = weights / weights.sum()
    return p


def chi_square(counts: np.ndarray, p: np.ndarray) -> tuple[float, int]:
    support = p > 0
    assert counts[~support].sum() == 0, "a token outside the target's support came out"
    expected = p[support] * counts.sum()
    return float(((counts[support] - expected) ** 2 / expected).sum()), int(support.sum()) - 1


def outcomes(rule, scores, params, proposed, draws: int = 20000, seed: int = 7) -> np.ndarray:
    rng, counts = np.random.default_rng(seed), np.zeros(scores.shape[-1], dtype=np.int64)
    for _ in range(draws):
        counts[rule(scores, params, proposed, rng)[1]] += 1
    return counts


SCORES = np.log(np.array([0.30, 0.22, 0.15, 0.12, 0.09, 0.06, 0.04, 0.02], dtype=np.float32))
CASES = [  # (params, proposed token): likely, unlikely, outside top-k, outside the nucleus
    (SamplingParams(temperature=1.0), 0),
    (SamplingParams(temperature=1.0), 6),
    (SamplingParams(temperature=0.7, top_k=4), 5),
    (SamplingParams(temperature=1.3, top_p=0.8), 1),
    (SamplingParams(temperature=1.3, top_p=0.8), 7),
]


@pytest.mark.parametrize(("params", "proposed"), CASES)
def test_accepting_a_proposal_keeps_the_target_distribution(params, proposed):
    p = target(SCORES, params)
    statistic, freedom = chi_square(outcomes(accept_token, SCORES, params, proposed), p)
    assert statistic < CHI2_999[freedom], (statistic, freedom)


def test_the_chi_square_check_catches_the_classic_wrong_rule():
    """Resampling from p *with* the proposal left in gives P(x) = p(x)(2 - p(x)): the check must see that."""
    def wrong(scores, params, proposed, rng):
        ids, weights = candidate_weights(scores, params)
        if rng.random() < weights[proposed] / weights.sum():
            return True, proposed
        return False, int(rng.choice(len(weights), p=weights / weights.sum()))

    params = SamplingParams(temperature=1.0)
    statistic, freedom = chi_square(outcomes(wrong, SCORES, params, 0), target(SCORES, params))
    assert statistic > CHI2_999[freedom] * 5


def test_greedy_accepts_exactly_the_argmax():
    greedy = SamplingParams(temperature=0)
    rng = np.random.default_rng(0)
    assert accept_token(SCORES, greedy, 0, rng) == (True, 0)
    assert accept_token(SCORES, greedy, 3, rng) == (False, 0)


def test_k_is_chosen_by_tokens_per_unit_of_step_time():
    """With the step costs bench/results/speculation-2026-12-05.md measured at bench-110m: at fp32 a wide
    check is nearly free, at int4 (MatMulNBits off its one-row kernel) it only pays at high acceptance."""
    fp32 = {1: 1.03, 2: 1.08, 3: 1.12, 4: 1.16}
    int4 = {1: 1.31, 2: 1.79, 3: 2.1, 4: 2.36}
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert best_k(0.5, 4, lambda k, t: fp32[k]) == 3 and best_k(0.8, 4, lambda k, t: fp32[k]) == 4
    assert best_k(0.02, 4, lambda k, t: fp32[k]) == 0
    assert best_k(0.5, 4, lambda k, t: int4[k]) == 1 and best_k(0.25, 4, lambda k, t: int4[k]) == 0
    assert best_k(0.9, 4, lambda k, t: int4[k]) == 4
    assert best_k(0.5, 4, lambda k, t: None) == 4  # not measured yet: tried, so that it gets measured


def test_k_pays_for_the_host_work_per_check_not_for_the_tokens_it_wins():
    """A tiny model: a pass of 0.2 ms, 0.05 ms of host work per token. Each check adds 0.1 ms of its own host
    work beside a pass 1.2x a plain one: at 30 % acceptance checking loses (passes alone: 1.39 tokens for 1.2
    passes)."""
    costs = CheckCosts()
    for _ in range(3):
        costs.observe_plain(0.20e-3, 0.25e-3)
    for tokens in (1, 2, 3):  # the same fixed part, whatever the check emitted
        costs.observe_check(2, 0.24e-3 + 0.1e-3 + tokens * 0.05e-3, tokens)
    assert costs.relative(2, 1.0) == pytest.approx((0.34 + 0.05) / 0.25)
    assert costs.relative(2, 3.0) == pytest.approx((0.34 + 0.15) / 0.25)  # each token costs what it costs plainly
    assert best_k(0.3, 2, costs.relative) == 0
    assert best_k(0.9, 2, costs.relative) == 2  # 2.71 tokens for (0.34 + 0.14) ms against 0.68 ms plainly


def test_check_costs_shrug_off_one_preempted_step_and_bound_the_ks_not_measured():
    """A running mean once took one 50x pass for the cost of k = 2 and never tried k = 2 again; a median does not."""
    costs = CheckCosts()
    assert costs.relative(2, 1.0) is None and not costs.plain_measured
    for seconds in (1e-3, 1e-3, 1.1e-3):
        costs.observe_plain(seconds, seconds)  # no host work: the cost is the passes'
    for seconds in (5e-2, 1.2e-3, 1.2e-3):  # the first pass: a binding built, or the process preempted
        costs.observe_check(2, seconds, 1)
    assert costs.relative(2, 1.0) == pytest.approx(1.2)
    assert costs.relative(4, 1.0) == pytest.approx(1.2)  # at least what a narrower check costs: tried, then measured
    assert costs.relative(1, 1.0) == pytest.approx(1.1)  # between a plain pass and k = 2
    costs.observe_check(3, 1e-3, 1)
    assert costs.relative(3, 1.0) == pytest.approx(1.2)  # one pass is not a measurement yet


def test_a_k_left_unchosen_is_forgotten_and_tried_again():
    """Slow first checks of k = 4 (a binding built, the cache grown) priced it out; best_k then never chose it and
    it was never measured again. Its samples age out, and it is bounded by the narrower k measured since."""
    costs = CheckCosts()
    costs.observe_plain(1e-3, 1e-3)
    for _ in range(3):
        costs.observe_check(4, 5e-3, 1)
        costs.observe_check(2, 1.1e-3, 1)
    assert costs.relative(4, 1.0) == pytest.approx(5.0) and best_k(0.9, 4, costs.relative) == 3  # 3: not measured
    for _ in range(CheckCosts.FORGET_AFTER - 3):
        costs.observe_check(2, 1.1e-3, 1)
    assert costs.relative(4, 1.0) == pytest.approx(1.1)  # forgotten: no dearer than k = 2 until measured again
    assert best_k(0.9, 4, costs.relative) == 4


def test_greedy_choices_are_the_per_position_draws_or_nothing():
    rng = np.random.default_rng(3)
    rows = rng.normal(size=(5, 40)).astype(np.float32)
    greedy = SamplingParams(temperature=0)
    one_by_one = [accept_token(row, greedy, 0, rng)[1] for row in rows]
    assert greedy_choices(rows, greedy).tolist() == one_by_one
    # whatever the history or a per-token choice changes goes through each position's processed scores
    for params in (SamplingParams(temperature=0, repetition_penalty=1.1), SamplingParams(temperature=0.7),
                   SamplingParams(temperature=0, logit_bias=((3, 5.0),)),
                   SamplingParams(temperature=0, top_logprobs=2)):
        assert greedy_choices(rows, params) is None
    rows[2, 7] = np.nan  # processed_scores maps it to the lowest score; argmax would pick it
    assert greedy_choices(rows, greedy) is None


def test_proposal_length_estimates_the_per_position_rate_and_pauses_when_nothing_pays():
    length = ProposalLength(k_max=4, patience=2, pause=3, rate=0.5)
    assert length.next_k() == 4
    for _ in range(30):
        length.update(4, 1)  # one kept, then a rejection: two positions tested, one accepted
    assert length.rate == pytest.approx(0.5, abs=1e-3)
    for _ in range(30):
        length.update(4, 4)  # every position tested was accepted
    assert length.rate > 0.99
    length.update(2, 0)
    length.update(2, 0)  # two proposals in a row gained nothing: pause
    assert [length.next_k() for _ in range(4)] == [0, 0, 0, 4]
    assert length.rate < 0.5  # the misses pulled the acceptance rate down


def test_new_sequences_start_from_the_engines_recent_acceptance_within_bounds():
    """Checks that keep failing pull the next sequences' starting estimate down to the floor (an int4 check of 1
    proposal, 1.35 steps, is then not probed: 1.35 tokens for 1.35 steps), never below; accepted ones raise it
    back, never above the first sequence's start."""
    prior = AcceptancePrior()
    assert prior.rate == ProposalLength().rate == AcceptancePrior.START
    for _ in range(200):
        prior.update(2, 0)
    assert prior.rate == AcceptancePrior.FLOOR
    assert best_k(prior.rate, 4, lambda k, t: {1: 1.35, 2: 1.76, 3: 2.1, 4: 2.46}[k]) == 0
    assert best_k(prior.rate, 4, lambda k, t: {1: 1.05, 2: 1.07, 3: 1.1, 4: 1.15}[k]) > 0  # cheap: still probed
    prior.update(3, 1)
    assert AcceptancePrior.FLOOR < prior.rate < AcceptancePrior.START
    for _ in range(200):
        prior.update(4, 4)
    assert prior.rate == AcceptancePrior.START
