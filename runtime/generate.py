"""Generation stage 3: the decode loop in three layers — token iterator → text stream → completion.

The CLI, the JSON path and the SSE path all sit on `TextStream`, so streamed and non-streamed
answers are the same bytes by construction.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from llmpack.runtime.backend import Backend
from llmpack.runtime.detokenizer import StreamingDetokenizer
from llmpack.runtime.protocol import Usage
from llmpack.runtime.sampling import SamplingParams, TokenHistory, make_rng, sample_token
from llmpack.runtime.tokenizer import Tokenizer

FINISH_STOP = "stop"  # the model produced a stop id
FINISH_LENGTH = "length"  # max_tokens reached, or the context is full


class TokenStream:
    """Iterates the generated ids (stop ids excluded); afterwards says why it ended."""

    def __init__(self, backend: Backend, prompt_ids: Sequence[int], max_tokens: int,
                 sampling: SamplingParams, stop_ids: Sequence[int]):
        self.backend = backend
        self.prompt_ids = list(prompt_ids)
        # Never past the context: the budget is whichever runs out first.
        self.budget = min(max_tokens, backend.context_length - len(self.prompt_ids))
        self.sampling = sampling
        self.stop_ids = frozenset(stop_ids)
        self.finish_reason: str | None = None
        self.generated = 0

    def __iter__(self) -> Iterator[int]:
        rng = make_rng(self.sampling.seed)
        history = TokenHistory(self.backend.vocab_size, self.prompt_ids)
        try:
            logits = self.backend.prefill(self.prompt_ids)
            while True:
                if self.generated >= self.budget:
                    self.finish_reason = FINISH_LENGTH
                    return
                token = sample_token(logits, self.sampling, rng, history)
                if token in self.stop_ids:
                    self.finish_reason = FINISH_STOP
                    return
                self.generated += 1
                yield token
                if self.generated < self.budget:
                    history.add(token)
                    logits = self.backend.decode(token)
        finally:
            self.backend.reset()


class TextStream:
    """Iterates the response text in pieces as tokens arrive; never splits a UTF-8 character."""

    def __init__(self, tokens: TokenStream, tokenizer: Tokenizer):
        self.tokens = tokens
        self.tokenizer = tokenizer

    def __iter__(self) -> Iterator[str]:
        detokenizer = StreamingDetokenizer(self.tokenizer)
        for token in self.tokens:
            piece = detokenizer.add(token)
            if piece:
                yield piece
        tail = detokenizer.flush()
        if tail:
            yield tail

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
