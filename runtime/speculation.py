"""Engine core: exact speculative decoding's pure halves — propose tokens by prompt lookup, accept them exactly.

A decode step at batch 1 is bound by reading the weights, so checking k proposed tokens in one pass costs
little more than generating one. Proposals come from the sequence itself (prompt-lookup / n-gram decoding:
the tokens that followed the most recent earlier occurrence of its last n tokens), so no draft model ships.
Acceptance keeps the target's distribution exactly: the proposal is a point mass q = δ(x), so speculative
sampling accepts x with probability min(1, p(x)/q(x)) = p(x) and, on a rejection, draws from p with x
removed and renormalized — P(x) = p(x), P(y) = (1 − p(x)) · p(y) / (1 − p(x)) = p(y). Greedy accepts x
exactly when it is the argmax. `p` is the distribution `sample_from_scores` draws from (penalties, logit
bias, temperature, top-k, top-p), computed by the caller with the accepted tokens in the history.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from llmpack.runtime.sampling import SamplingParams, candidate_weights, draw_index


class Proposer(Protocol):
    """What the scheduler asks for each running sequence; a draft-model proposer implements the same."""

    def add(self, token_id: int) -> None:
        """The sequence grew by this token (prompt or accepted output)."""
        ...

    def propose(self, k: int) -> list[int]:
        """Up to k tokens likely to come next; [] when there is no guess."""
        ...


@dataclass
class NgramProposer:
    """Prompt lookup: for n from max_n down to min_n, the most recent earlier occurrence of the last n tokens,
    and the tokens that followed it. An index of every n-gram's latest end keeps each step O(max_n)."""

    max_n: int = 4
    min_n: int = 2
    tokens: list[int] = field(default_factory=list)
    # (n-gram) -> index just past its most recent occurrence that has a following token
    _latest: dict[tuple[int, ...], int] = field(default_factory=dict)

    def add(self, token_id: int) -> None:
        # The n-grams ending at the previous last token now have a follower: index them.
        end = len(self.tokens)
        for n in range(self.min_n, self.max_n + 1):
            if end >= n:
                self._latest[tuple(self.tokens[end - n:end])] = end
        self.tokens.append(token_id)

    def extend(self, token_ids) -> NgramProposer:
        for token in token_ids:
            self.add(int(token))
        return self

    def propose(self, k: int) -> list[int]:
        if k <= 0:
            return []
        for n in range(min(self.max_n, len(self.tokens)), self.min_n - 1, -1):
            start = self._latest.get(tuple(self.tokens[len(self.tokens) - n:]))
            if start is not None:
                return self.tokens[start:start + k]
        return []


def accept_token(scores: np.ndarray, params: SamplingParams, proposed: int,
                 rng: np.random.Generator) -> tuple[bool, int]:
    """(accepted, the token that goes out): `proposed` when accepted, else a draw from p without it.

    scores: the processed scores at this position (sampling.processed_scores with the history so far).
    """
    if params.greedy:
        best = int(np.argmax(scores))
        return best == proposed, best
    ids, weights = candidate_weights(scores, params)
    weights = weights.astype(np.float64)
    index = proposed if ids is None else _position(ids, proposed)
    mass = float(weights[index]) / float(weights.sum()) if index is not None else 0.0
    if rng.random() < mass:
        return True, proposed
    if index is not None:
        weights[index] = 0.0
    choice = draw_index(weights, rng.random())
    return False, choice if ids is None else int(ids[choice])


def _position(ids: np.ndarray, token: int) -> int | None:
    where = np.flatnonzero(ids == token)
    return int(where[0]) if where.size else None


@dataclass
class ProposalLength:
    """k per sequence, following its recent acceptance: up by one after a fully accepted proposal, halved
    after a mostly rejected one; after `patience` proposals in a row that gained nothing, proposing pauses
    for `pause` steps (a text that never repeats itself stops paying for the wider step)."""

    k_max: int = 4
    patience: int = 3
    pause: int = 16
    k: int = 2
    _misses: int = 0
    _paused: int = 0

    def next_k(self) -> int:
        if self._paused > 0:
            self._paused -= 1
            return 0
        return self.k

    def update(self, proposed: int, accepted: int) -> None:
        if proposed == 0:
            return
        self._misses = self._misses + 1 if accepted == 0 else 0
        if accepted == proposed:
            self.k = min(self.k + 1, self.k_max)
        elif 2 * accepted < proposed:
            self.k = max(self.k // 2, 1)
        if self._misses >= self.patience:
            self._misses, self._paused = 0, self.pause
