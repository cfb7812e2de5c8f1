"""Engine core: what a caller asks of the engine (a validated request) and what it reports back (usage).

The serve wing parses wire bodies into these; the engine, the CLI and the benchmarks use them without
knowing any wire format.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmpack.runtime.errors import InputTooLong
from llmpack.runtime.sampling import SamplingParams
from llmpack.runtime.template import Message


@dataclass(frozen=True)
class GenerationRequest:
    """A request already checked against its schema; the rules of turns are the engine's chat format's to check."""

    prompt: str | None
    messages: tuple[Message, ...] | None
    raw: bool
    stream: bool
    max_tokens: int
    sampling: SamplingParams

    @property
    def text_chars(self) -> int:
        """How much text there is to tokenize (the prompt, or every message's content)."""
        if self.messages is not None:
            return sum(len(message.content) for message in self.messages)
        return len(self.prompt or "")


def check_prompt_length(prompt_tokens: int, limit: int) -> None:
    """Refuse a prompt whose encoded length is over the input limit (the engine's, from EngineOptions)."""
    if prompt_tokens > limit:
        raise InputTooLong(
            f"prompt is {prompt_tokens} tokens, the limit is {limit}; shorten the prompt or the "
            "conversation history"
        )


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }
