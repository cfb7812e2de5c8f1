"""Speculative decoding's pure halves (runtime/speculation.py): prompt-lookup proposals against a brute-force
search, and acceptance that keeps the target distribution exactly (chi-square on fixed seeds: deterministic,
and shown to reject the classic wrong rule), greedy acceptance, and the adaptive proposal length."""

from __future__ import annotations

import numpy as np
import pytest

from llmpack.runtime.sampling import SamplingParams, candidate_weights
from llmpack.runtime.speculation import NgramProposer, ProposalLength, accept_token

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


def test_proposal_length_follows_acceptance_and_pauses_when_nothing_pays():
    length = ProposalLength(k_max=4, patience=2, pause=3, k=2)
    length.update(2, 2)
    length.update(3, 3)
    assert length.next_k() == 4
    length.update(4, 4)
    assert length.next_k() == 4  # capped at k_max
    length.update(4, 1)
    assert length.next_k() == 2  # mostly rejected: halved
    length.update(2, 0)
    length.update(2, 0)  # two proposals in a row gained nothing: pause
    assert [length.next_k() for _ in range(4)] == [0, 0, 0, 1]
