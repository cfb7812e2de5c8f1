"""Engine core: exact speculative decoding's pure halves — propose tokens by prompt lookup, accept them exactly.

A decode step at batch 1 is bound by reading the weights, so checking k proposed tokens in one pass costs
little more than generating one. Proposals come from the sequence itself (prompt-lookup / n-gram decoding:
the tokens that followed the most recent earlier occurrence of its last n tokens), so no draft model ships.
Acceptance keeps the target's distribution exactly, and more: each checked position draws its token the
way plain decoding would (the same processed distribution, penalties and logit bias with the accepted
tokens in the history, then temperature, top-k, top-p and ONE uniform from the sequence's generator) and
accepts the proposal when the draw equals it. With a point-mass proposal this accepts x with probability
p(x), as speculative sampling's min(1, p/q) rule does, but it also consumes the generator exactly as
decoding without speculation does, so a seeded answer does not depend on whether (or how much) the
engine speculated — which its cost model decides from measured step times. Greedy is the same rule.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from llmpack.runtime.sampling import SamplingParams, sample_from_scores

# The most proposed tokens one step checks (`--speculate-max`); the cost model picks k up to it per step. 4: at
# bench-110m fp32 a 5-fed check costs 1.15-1.32 decode steps, a 9-fed one 1.46-1.75 (bench/results/speculation-*).
DEFAULT_MAX_PROPOSED = 4


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
    """(accepted, the token that goes out): the position's token is drawn exactly as plain decoding draws it
    (sample_from_scores: one uniform from the sequence's own generator), and the proposal is accepted when
    the draw equals it. So a seeded answer is the same token for token with speculation on or off.

    scores: the processed scores at this position (sampling.processed_scores with the history so far).
    """
    token = sample_from_scores(scores, params, rng)
    return token == proposed, token


def greedy_choices(rows: np.ndarray, params: SamplingParams) -> np.ndarray | None:
    """Every checked position's greedy token in one vectorised argmax, when the processed scores are the
    logits themselves (greedy, no penalty, no logit bias, no logprobs wanted, all finite); None: each
    position goes through processed_scores and accept_token. The same tokens either way — this only skips
    redoing per position what does not depend on the history (on a small model that work rivals the step)."""
    plain = params.greedy and params.repetition_penalty == 1.0 and not (
        params.frequency_penalty or params.presence_penalty or params.logit_bias or params.top_logprobs is not None)
    if not plain or not np.isfinite(rows).all():
        return None
    return rows.argmax(axis=-1)


def expected_tokens(rate: float, k: int) -> float:
    """Tokens a step checking k proposals yields when each is accepted with probability `rate`, in order:
    1 + rate + … + rate^k (the token after the last accepted one always comes out)."""
    return sum(rate ** i for i in range(k + 1))


def best_k(rate: float, k_max: int, relative_cost: Callable[[int, float], float | None]) -> int:
    """The k whose tokens per unit of step time beat plain decoding (k = 0) the most; 0 when none does.

    relative_cost(k, tokens): a step checking k proposals that yields `tokens` tokens, over one plain decode
    step, as measured (None: not yet, taken as 1 so that it gets tried). Where a wider step costs much more
    (int4 on 2 cores: MatMulNBits leaves its one-row kernel), or where the host work around a check outweighs
    a tiny model's pass, speculation stops paying and is not used.
    """
    best, best_value = 0, 1.0
    for k in range(1, k_max + 1):
        tokens = expected_tokens(rate, k)
        cost = relative_cost(k, tokens)
        value = tokens / (1.0 if cost is None else cost)
        if value > best_value * 1.02:  # a margin: timing noise should not flip a sequence into speculating
            best, best_value = k, value
    return best


def position_rate(proposed: int, accepted: int) -> float:
    """A check's per-position acceptance: it tested positions up to its first rejection, so keeping `accepted`
    of `proposed` made accepted + (accepted < proposed) trials (the geometric model's estimate)."""
    return accepted / (accepted + (accepted < proposed))


class AcceptancePrior:
    """Where a new sequence's acceptance estimate starts: the recent per-position acceptance of this engine's
    checks, all sequences together, kept within [FLOOR, START]. A fixed optimistic start made every sequence
    probe: with random-weight bench-110m at int4 (a 1-proposal check costs 1.35 steps, 11-30 % accepted) those
    probes lost 4-5 %. At the floor a check that costs over 1.32 steps is not probed, a cheaper one still is
    (so a workload that starts repeating is found again); START is the first sequence's, before any check."""

    START, FLOOR, WEIGHT = 0.6, 0.35, 0.05

    def __init__(self):
        self.rate = self.START

    def update(self, proposed: int, accepted: int) -> None:
        if proposed:
            self.rate += self.WEIGHT * (position_rate(proposed, accepted) - self.rate)
            self.rate = min(max(self.rate, self.FLOOR), self.START)


@dataclass
class ProposalLength:
    """How far a sequence may look ahead, from its recent acceptance. `rate` estimates the chance that a
    checked position is accepted: a check tests positions until its first rejection, so a step that kept a of
    its k proposals made a + (a < k) trials (the geometric model's estimate; kept / proposed understated it,
    and best_k then chose k too short). After `patience` proposals in a row that gained nothing, proposing
    pauses for `pause` steps (a text that never repeats itself stops paying for the wider step).

    k itself is best_k's choice from this rate and the measured costs, up to k_max: halving a sequence's k after
    a miss, as before, could leave it at a k = 1 the costs never pay for, and then it never grew back."""

    k_max: int = DEFAULT_MAX_PROPOSED
    patience: int = 3
    pause: int = 16
    rate: float = AcceptancePrior.START
    _misses: int = 0
    _paused: int = 0

    def next_k(self) -> int:
        if self._paused > 0:
            self._paused -= 1
            return 0
        return self.k_max

    def update(self, proposed: int, accepted: int) -> None:
        if proposed == 0:
            return
        self.rate += 0.3 * (position_rate(proposed, accepted) - self.rate)
        self._misses = self._misses + 1 if accepted == 0 else 0
        if self._misses >= self.patience:
            self._misses, self._paused = 0, self.pause


class CheckCosts:
    """What a check of k speculated tokens costs against plain decoding, from the whole steps measured here.

    Whole steps, host work included: on a small model the Python around a check (the lookup, choosing and
    handing out each token, truncating) rivals the pass, and a model that timed passes alone let checks that
    gained 20 % per pass lose 12 % per token. But a check must not be charged for the tokens it wins (handing
    a token out costs the same whichever step chose it; charging it halted speculation where it paid). So a
    plain step is split into its pass P and its host work per token e = W - P (W: the whole plain step), and a
    check of k that emitted n tokens into a fixed part F_k = step - n * e (its pass and its own host work) and
    n tokens' worth of e. A check yielding t tokens then costs (F_k + t * e) / W plain steps.

    Medians of recent steps: a shape's first pass builds its IO binding (and may grow the cache), and on a
    shared machine one preempted step can take 50 times the others. A running mean took such an outlier for the
    cost of that k, best_k then never chose it again, so it was never measured again. A median can be caught the
    same way while a k has few samples (its first checks build an IO binding and grow the cache), so a k's
    samples are forgotten FORGET_AFTER steps after they were taken: a k left alone that long is tried again
    (3 checks in 512 steps, under 1 % where it truly costs more). Below MIN_SAMPLES a k is not measured: best_k
    tries it unless the measured ks bound it. Medians are recomputed on each step, not on each lookup.
    """

    WINDOW = 15
    MIN_SAMPLES = 3
    FORGET_AFTER = 512

    def __init__(self):
        self._passes: deque[float] = deque(maxlen=self.WINDOW)
        self._steps: deque[float] = deque(maxlen=self.WINDOW)
        self._checks: dict[int, deque[tuple[int, float, int]]] = {}  # k -> (when, step seconds, tokens)
        self._clock = 0  # steps observed
        self._plain: tuple[float, float] | None = None  # medians: (pass P, whole step W)
        self._fixed: dict[int, float] = {}  # k -> F_k, the median of (check step - tokens * e)

    @property
    def plain_measured(self) -> bool:
        return self._plain is not None

    @property
    def _host_per_token(self) -> float:
        pass_, step = self._plain
        return max(step - pass_, 0.0)

    def observe_plain(self, pass_seconds: float, step_seconds: float) -> None:
        self._tick()
        self._passes.append(pass_seconds)
        self._steps.append(max(step_seconds, pass_seconds))
        self._plain = statistics.median(self._passes), statistics.median(self._steps)

    def observe_check(self, k: int, step_seconds: float, tokens: int) -> None:
        self._tick()
        samples = self._checks.setdefault(k, deque(maxlen=self.WINDOW))
        samples.append((self._clock, step_seconds, tokens))
        if len(samples) >= self.MIN_SAMPLES and self._plain is not None:
            e = self._host_per_token
            self._fixed[k] = statistics.median(step - n * e for _, step, n in samples)

    def _tick(self) -> None:
        self._clock += 1
        oldest = self._clock - self.FORGET_AFTER
        for k, samples in self._checks.items():
            while samples and samples[0][0] < oldest:
                samples.popleft()
            if len(samples) < self.MIN_SAMPLES:
                self._fixed.pop(k, None)

    def relative(self, k: int, tokens: float) -> float | None:
        """A check of k yielding `tokens` tokens over one plain step: measured, else bounded by what is (a wider
        check never costs less than a narrower one; below the narrowest measured, a straight line from a plain
        pass to it), so a backend whose checks cost far more is not explored k by k; None: nothing to go on."""
        if self._plain is None:
            return None
        fixed = self._fixed_part(k)
        return None if fixed is None else (fixed + tokens * self._host_per_token) / self._plain[1]

    def _fixed_part(self, k: int) -> float | None:
        known = self._fixed
        if k in known:
            return known[k]
        below = [j for j in known if j < k]
        if below:
            return known[max(below)]
        above = min((j for j in known if j > k), default=None)
        pass_ = self._plain[0]
        return None if above is None else pass_ + (known[above] - pass_) * k / above
