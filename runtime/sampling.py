"""Logits -> next token id: penalties, temperature, top-k, top-p and the seeded draw, as pure functions.

Order per step, as in Hugging Face's logits processors: penalties on the raw logits, then the
logit bias (OpenAI's `logit_bias`: added to the logits before sampling), then temperature, top-k,
top-p, then one uniform draw from the seeded generator. Every step is O(vocab)
vectorised work; nothing sorts the whole vocabulary unless the nucleus really spans most of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from llmpack.runtime.errors import InvalidRequest

SEED_MIN, SEED_MAX = 1, 9_999_999_999
LOGIT_BIAS_MAX, LOGIT_BIAS_ENTRIES = 100.0, 300  # OpenAI's: each bias within ±100, at most 300 ids
TOP_LOGPROBS_MAX = 20  # OpenAI's bound on the alternatives reported per token
# Candidates looked at before falling back to a full sort for top-p; a real nucleus is far smaller.
_NUCLEUS_PROBE = 256
# Block size for the two-level draw over the whole vocabulary.
_DRAW_BLOCK = 512


@dataclass(frozen=True)
class SamplingParams:
    """Workers AI's sampling fields; defaults are the service's."""

    temperature: float = 0.6
    top_k: int | None = None
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias); the caller checks ids against the vocab
    # Report each token's log probability and this many most likely alternatives (None: report nothing).
    top_logprobs: int | None = None

    def validate(self) -> SamplingParams:
        """Raise InvalidRequest naming the first field out of Workers AI's range; return self."""
        _check_range("temperature", self.temperature, 0.0, 5.0)
        if self.top_k is not None:
            _check_int_range("top_k", self.top_k, 1, 50)
        _check_range("top_p", self.top_p, 0.0, 2.0)
        _check_range("repetition_penalty", self.repetition_penalty, 0.0, 2.0, low_open=True)
        _check_range("frequency_penalty", self.frequency_penalty, 0.0, 2.0)
        _check_range("presence_penalty", self.presence_penalty, 0.0, 2.0)
        if self.seed is not None:
            _check_int_range("seed", self.seed, SEED_MIN, SEED_MAX)
        if len(self.logit_bias) > LOGIT_BIAS_ENTRIES:
            raise InvalidRequest(f"logit_bias: at most {LOGIT_BIAS_ENTRIES} token ids, got {len(self.logit_bias)}")
        for token, bias in self.logit_bias:
            _check_range(f"logit_bias[{token}]", bias, -LOGIT_BIAS_MAX, LOGIT_BIAS_MAX)
        if self.top_logprobs is not None:
            _check_int_range("top_logprobs", self.top_logprobs, 0, TOP_LOGPROBS_MAX)
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _check_range(name: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or not math.isfinite(value):
        raise InvalidRequest(f"{name}: must be a finite number, got {value!r}")
    if value > high or value < low or (low_open and value == low):
        bounds = f"greater than {low:g} and at most {high:g}" if low_open else f"between {low:g} and {high:g}"
        raise InvalidRequest(f"{name}: must be {bounds}, got {value!r}")


def _check_int_range(name: str, value: int, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidRequest(f"{name}: must be an integer from {low} to {high}, got {value!r}")


class TokenHistory:
    """What the penalties look at: ids seen in prompt + output, and counts of generated ids."""

    def __init__(self, vocab_size: int, prompt_ids: list[int] | np.ndarray = ()):
        self.seen = np.zeros(vocab_size, dtype=bool)
        self.seen[np.asarray(prompt_ids, dtype=np.int64)] = True
        self.generated_counts = np.zeros(vocab_size, dtype=np.int32)

    def add(self, token_id: int) -> None:
        self.seen[token_id] = True
        self.generated_counts[token_id] += 1


def make_rng(seed: int | None) -> np.random.Generator:
    """Same seed, same draws; no seed draws fresh entropy from the OS."""
    return np.random.default_rng(seed)


def apply_penalties(logits: np.ndarray, params: SamplingParams, history: TokenHistory) -> np.ndarray:
    """Repetition (HF/CTRL style) then frequency/presence (OpenAI style); never changes `logits`."""
    if params.repetition_penalty == 1.0 and not (params.frequency_penalty or params.presence_penalty):
        return logits
    out = np.array(logits, dtype=np.float32, copy=True)
    if params.repetition_penalty != 1.0:
        ids = np.flatnonzero(history.seen)
        values = out[ids]
        # Dividing a negative logit would raise it, so HF multiplies those instead (processed_scores keeps the
        # quotient of a penalty near 0 finite).
        with np.errstate(over="ignore", divide="ignore"):
            out[ids] = np.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if params.frequency_penalty or params.presence_penalty:
        ids = np.flatnonzero(history.generated_counts)
        counts = history.generated_counts[ids].astype(np.float32)
        out[ids] -= counts * params.frequency_penalty + params.presence_penalty
    return out


def apply_logit_bias(logits: np.ndarray, bias: tuple[tuple[int, float], ...]) -> np.ndarray:
    """Each (id, bias) added to that id's logit; never changes `logits` (it may be the backend's buffer)."""
    if not bias:
        return logits
    out = np.array(logits, dtype=np.float32, copy=True)
    ids, values = zip(*bias)
    out[np.asarray(ids, dtype=np.int64)] += np.asarray(values, dtype=np.float32)
    return out


def top_k_ids(logits: np.ndarray, k: int) -> np.ndarray:
    """Ids of exactly the k largest logits (ties broken arbitrarily), in no particular order."""
    if k >= logits.shape[-1]:
        return np.arange(logits.shape[-1])
    return np.argpartition(logits, -k)[-k:]


def nucleus_ids(probs: np.ndarray, p: float) -> np.ndarray:
    """Ids, most likely first, of the smallest set whose probability reaches p (at least one id)."""
    ranked = _ranked_nucleus_candidates(probs, p)
    ranked_probs = probs[ranked].astype(np.float64)  # float32 sums drift over thousands of ids
    before = np.cumsum(ranked_probs) - ranked_probs  # mass of the better tokens
    keep = ranked[before < p]
    return keep if keep.size else ranked[:1]


def _ranked_nucleus_candidates(probs: np.ndarray, p: float) -> np.ndarray:
    """Ids by falling probability, enough of them to hold the nucleus; sorts a few hundred at most."""
    size = probs.shape[-1]
    if size > _NUCLEUS_PROBE:
        top = np.argpartition(probs, -_NUCLEUS_PROBE)[-_NUCLEUS_PROBE:]
        if probs[top].sum() >= p:
            return top[np.argsort(-probs[top], kind="stable")]
    return np.argsort(-probs, kind="stable")


def filter_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """The logits with all but the k largest set to -inf."""
    return _keep_only(logits, top_k_ids(logits, k))


def filter_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """The logits with everything outside the top-p nucleus set to -inf; p >= 1 keeps all."""
    if p >= 1.0:
        return logits
    return _keep_only(logits, nucleus_ids(softmax(logits), p))


def _keep_only(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    out = np.full_like(logits, -np.inf)
    out[ids] = logits[ids]
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities in the logits' dtype; -inf logits get exactly 0."""
    weights = np.exp(logits - np.max(logits))
    weights /= weights.sum()
    return weights


def processed_scores(logits: np.ndarray, params: SamplingParams, history: TokenHistory | None = None) -> np.ndarray:
    """The logits the choice is made from: penalties, then the logit bias (never changes `logits`).

    Kept finite: a repetition penalty near its open bound 0 (5e-324 is in range) divides seen tokens'
    logits to infinity, and inf - inf is NaN in every softmax and log probability after it; such scores
    are held at float32's largest magnitudes, which keeps their order.
    """
    scores = apply_penalties(logits, params, history) if history is not None else logits
    scores = apply_logit_bias(scores, params.logit_bias)
    if not np.isfinite(scores).all():
        limit = np.finfo(np.float32).max
        scores = np.nan_to_num(scores, nan=-limit, posinf=limit, neginf=-limit)
    return scores


def sample_token(
    logits: np.ndarray,
    params: SamplingParams,
    rng: np.random.Generator,
    history: TokenHistory | None = None,
) -> int:
    """Choose the next id from last-position logits [vocab]; greedy when temperature is 0."""
    return sample_from_scores(processed_scores(logits, params, history), params, rng)


@dataclass(frozen=True)
class TokenLogprobs:
    """A chosen token's log probability and the `top` most likely ids with theirs, most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def token_logprobs(scores: np.ndarray, params: SamplingParams, token: int, top: int) -> TokenLogprobs:
    """Log-softmax of the processed scores divided by the temperature (1 when greedy): the distribution
    the token is drawn from before top-k / top-p narrow it. Computed in float64."""
    z = scores.astype(np.float64) / (params.temperature if params.temperature > 0 else 1.0)
    peak = float(np.max(z))
    shifted = z - peak  # subtracted before the log-sum: at float32's largest scores, peak + log(sum) loses the sum
    logprobs = shifted - math.log(float(np.sum(np.exp(shifted))))
    best = top_k_ids(logprobs, top) if top else np.empty(0, dtype=np.int64)
    best = best[np.argsort(-logprobs[best], kind="stable")]
    return TokenLogprobs(token, float(logprobs[token]), tuple((int(i), float(logprobs[i])) for i in best))


def sample_from_scores(scores: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """The draw itself, over processed scores: argmax when greedy, else temperature, top-k, top-p, one uniform."""
    if params.greedy:
        return int(np.argmax(scores))
    ids, weights = candidate_weights(scores, params)
    # One uniform per step keeps the token stream a pure function of the seed.
    choice = draw_index(weights, rng.random())
    return choice if ids is None else int(ids[choice])


def candidate_weights(scores: np.ndarray, params: SamplingParams) -> tuple[np.ndarray | None, np.ndarray]:
    """The sampling distribution (not greedy): candidate ids (None: the whole vocabulary) and their weights,
    proportional to the probabilities the draw uses (temperature, top-k, top-p applied; not renormalized)."""
    # Narrow to candidate ids first so softmax and the draw run over k ids, not the vocabulary.
    ids = None if params.top_k is None else top_k_ids(scores, params.top_k)
    candidates = scores if ids is None else scores[ids]
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        scaled = candidates / np.float32(params.temperature)
    if not np.isfinite(scaled).all():  # a temperature so small the division overflows: its limit, the top ties
        scaled = np.where(candidates == np.max(candidates), np.float32(0), np.float32(-np.inf))
    probs = softmax(scaled)
    if params.top_p < 1.0:
        kept = nucleus_ids(probs, params.top_p)
        ids, probs = (kept if ids is None else ids[kept]), probs[kept]
    return ids, probs


def draw_index(weights: np.ndarray, u: float) -> int:
    """The index whose cumulative weight first exceeds u * total; zero weights are never chosen.

    A plain cumsum over 32000 weights is a slow sequential pass, so find the block first from
    vectorised block sums, then run the cumsum inside one block.
    """
    starts = np.arange(0, weights.shape[-1], _DRAW_BLOCK)
    block_cumulative = np.cumsum(np.add.reduceat(weights, starts, dtype=np.float64))
    target = u * block_cumulative[-1]
    block = min(int(np.searchsorted(block_cumulative, target, side="right")), len(starts) - 1)
    target -= block_cumulative[block - 1] if block else 0.0
    inside = weights[starts[block] : starts[block] + _DRAW_BLOCK]
    offset = int(np.searchsorted(np.cumsum(inside, dtype=np.float64), target, side="right"))
    if offset >= inside.size or inside[offset] == 0:
        # Rounding put the target past the block's last positive weight: take that weight.
        offset = int(np.flatnonzero(inside)[-1])
    return int(starts[block]) + offset
