"""Engine core: the decode loop in three layers — token sink/iterator → text stream → completion.

`SequenceState` decides each sequence's next token from its logits (sampling, stop ids, budget);
the batch scheduler drives many of them at once and hands each new token to its sequence's
`TokenSink`: a blocking `TokenStream` for the CLI and benchmarks (under `TextStream`), or the serve
wing's loop sink (serve/admission.py), whose request detokenizes with the same tokenizer stream decoder.
So streamed and non-streamed answers, CLI and server, are the same text by construction.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from llmpack.runtime.request import Usage
from llmpack.runtime.sampling import (
    SamplingParams,
    TokenHistory,
    TokenLogprobs,
    make_rng,
    processed_scores,
    sample_from_scores,
    token_logprobs,
)
from llmpack.runtime.speculation import NgramProposer, ProposalLength, accept_token, best_k, greedy_choices
from llmpack.runtime.tokenizer import TextTokenizer

FINISH_STOP = "stop"  # the model produced a stop id
FINISH_LENGTH = "length"  # max_tokens reached, or the context is full
FINISH_CANCELLED = "cancelled"  # the consumer went away
FINISH_ERROR = "error"  # the backend failed; the stream raises the error


@dataclass(frozen=True)
class _End:
    reason: str
    error: BaseException | None = None


class TokenSink:
    """One sequence's output as the batch thread delivers it: `put` each token, then one `end`.

    Both run on the batch thread, so an implementation only hands the token over and never blocks: a
    token crosses exactly one hand-off to whoever reads it (TokenStream below for a plain iterator,
    the serve wing's loop sink for an asyncio request). `cancel` may come from any thread; the batch
    scheduler then frees the sequence's slot at its next step.
    """

    def __init__(self, prompt_ids: Sequence[int]):
        self.prompt_ids = list(prompt_ids)
        self.cancelled = threading.Event()
        self.on_cancel: Callable[[], None] | None = None  # set by the scheduler: wakes its loop

    def started(self) -> None:
        """The sequence got a batch slot (its queue wait ends); batch thread. Nothing to do by default."""

    def put(self, token: int, logprobs: TokenLogprobs | None = None) -> None:
        """A new token; `logprobs` when the request asked for them (SamplingParams.top_logprobs)."""
        raise NotImplementedError

    def end(self, reason: str, error: BaseException | None = None) -> None:
        raise NotImplementedError

    def cancel(self) -> None:
        if not self.cancelled.is_set():
            self.cancelled.set()
            if self.on_cancel is not None:
                self.on_cancel()


class TokenStream(TokenSink):
    """The blocking consumer (CLI, benchmarks): iterates generated ids (stop ids excluded) as they come.

    Stopping the iteration early (a closed stream, a disconnected client) cancels the sequence, so
    the scheduler frees its slot at the next step.
    """

    def __init__(self, prompt_ids: Sequence[int]):
        super().__init__(prompt_ids)
        self.finish_reason: str | None = None
        self.generated = 0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()

    # producer side (the batch thread)
    def put(self, token: int, logprobs: TokenLogprobs | None = None) -> None:
        self._queue.put(token)

    def end(self, reason: str, error: BaseException | None = None) -> None:
        self._queue.put(_End(reason, error))

    # consumer side
    def __iter__(self) -> Iterator[int]:
        try:
            while True:
                item = self._queue.get()
                if isinstance(item, _End):
                    self.finish_reason = item.reason
                    if item.error is not None:
                        raise item.error
                    return
                self.generated += 1
                yield item
        finally:
            if self.finish_reason is None:
                self.finish_reason = FINISH_CANCELLED
                self.cancel()


class SequenceState:
    """One sequence's decisions: sample from its logits with its own seed, stop, or run out of budget."""

    def __init__(self, sink: TokenSink, max_tokens: int, sampling: SamplingParams,
                 stop_ids: Sequence[int], vocab_size: int, context_length: int):
        self.sink = sink
        self.prompt_ids = sink.prompt_ids
        # Never past the context: the budget is whichever runs out first.
        self.budget = min(max_tokens, context_length - len(self.prompt_ids))
        self.sampling = sampling
        self.stop_ids = frozenset(stop_ids)
        self.rng = make_rng(sampling.seed)
        self.history = TokenHistory(vocab_size, self.prompt_ids)
        self.generated = 0
        self.output_ids: list[int] = []  # what was sampled, in order (the cache holds all but the last)
        self.prefilled = 0
        self.finish_reason: str | None = None
        self.pending: int | None = None  # the token the next decode step must feed
        self.slot: int | None = None
        self.done = False
        # Speculative decoding (the scheduler turns it on): the sequence's own n-gram index, and its k
        self.proposer: NgramProposer | None = None
        self.proposal_length: ProposalLength | None = None

    def speculate(self, max_proposed: int, rate: float) -> None:
        """Propose up to max_proposed tokens a step, starting from this estimate of the acceptance rate."""
        self.proposer = NgramProposer().extend(self.prompt_ids)
        self.proposal_length = ProposalLength(k_max=max_proposed, rate=rate)

    def proposal(self, relative_cost: Callable[[int, float], float | None]) -> list[int]:
        """Tokens worth checking in the next step ([]: decode as usual); never past the budget, and only as
        many as pay for the wider step at this sequence's acceptance rate (speculation.best_k). The lookup
        comes first: it is cheaper than the cost model, and most steps of a text that does not repeat end there."""
        if self.proposer is None:
            return []
        k = min(self.proposal_length.next_k(), self.budget - self.generated - 1)
        guess = self.proposer.propose(k) if k > 0 else []
        k = best_k(self.proposal_length.rate, len(guess), relative_cost) if guess else 0
        return guess[:k]

    def advance(self, logits: np.ndarray) -> None:
        """Choose the next token from the last logits; emits it, or ends the sequence."""
        self.pending = None
        if self.generated >= self.budget:
            return self.finish(FINISH_LENGTH)
        scores = processed_scores(logits, self.sampling, self.history)
        self._emit(sample_from_scores(scores, self.sampling, self.rng), scores)

    def advance_speculated(self, rows: np.ndarray, proposal: list[int]) -> int:
        """rows[i]: the logits after the pending token and proposal[:i]. Emits the proposals accepted
        (speculation.accept_token: exact for greedy and sampling), then one token more — the draw that
        replaced a rejected one, or the next after all of them; returns how many proposals went out."""
        self.pending = None
        greedy = greedy_choices(rows, self.sampling)  # all positions at once where the history cannot matter
        for i, proposed in enumerate(proposal):
            if greedy is None:
                scores = processed_scores(rows[i], self.sampling, self.history)
                accepted, token = accept_token(scores, self.sampling, proposed, self.rng)
            else:
                scores, token = rows[i], int(greedy[i])
                accepted = token == proposed
            alive = self._emit(token, scores)
            if not accepted or not alive:
                return i + (accepted and token not in self.stop_ids)
        last = len(proposal)
        if greedy is None or self.generated >= self.budget:
            self.advance(rows[last])
        else:
            self._emit(int(greedy[last]), rows[last])
        return last

    def _emit(self, token: int, scores: np.ndarray) -> bool:
        """Send a chosen token out; False when the sequence ended with it (a stop id, or the budget)."""
        if token in self.stop_ids:
            self.finish(FINISH_STOP)
            return False
        self.generated += 1
        self.output_ids.append(token)
        self.history.add(token)
        if self.proposer is not None:
            self.proposer.add(token)
        wanted = self.sampling.top_logprobs
        self.sink.put(token, None if wanted is None else token_logprobs(scores, self.sampling, token, wanted))
        if self.generated >= self.budget:
            self.finish(FINISH_LENGTH)  # no decode step for a token nobody will sample after
            return False
        self.pending = token
        return True

    def finish(self, reason: str, error: BaseException | None = None) -> None:
        if not self.done:
            self.done, self.pending, self.finish_reason = True, None, reason
            self.sink.end(reason, error)


class TextStream:
    """Iterates the response text in pieces as tokens arrive; never splits a UTF-8 character."""

    def __init__(self, tokens: TokenStream, tokenizer: TextTokenizer):
        self.tokens = tokens
        self.tokenizer = tokenizer

    def __iter__(self) -> Iterator[str]:
        detokenizer = self.tokenizer.stream_decoder()
        token_iter = iter(self.tokens)
        try:
            for token in token_iter:
                piece = detokenizer.add(token)
                if piece:
                    yield piece
            tail = detokenizer.flush()
            if tail:
                yield tail
        finally:
            token_iter.close()  # an abandoned text stream cancels its sequence at once

    def cancel(self) -> None:
        self.tokens.cancel()

    @property
    def finish_reason(self) -> str | None:
        return self.tokens.finish_reason

    @property
    def usage(self) -> Usage:
        return Usage(prompt_tokens=len(self.tokens.prompt_ids), completion_tokens=self.tokens.generated)


@dataclass(frozen=True)
class Completion:
    text: str
    usage: Usage
    finish_reason: str


def complete(stream: TextStream) -> Completion:
    text = "".join(stream)
    return Completion(text=text, usage=stream.usage, finish_reason=stream.finish_reason or FINISH_LENGTH)
