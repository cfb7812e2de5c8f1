"""Generation stage 4: the engine — request in, text stream out; what the CLI and the server share.

It owns the artifact, tokenizer and backend, turns a validated request into prompt ids (template +
limits) and runs one sequence at a time on the backend.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from llmpack.runtime.artifact import Artifact, open_artifact, open_backend
from llmpack.runtime.errors import InputTooLong
from llmpack.runtime.generate import Completion, TextStream, TokenStream, complete
from llmpack.runtime.protocol import CONTEXT_LIMIT, INPUT_LIMIT, GenerationRequest
from llmpack.runtime.template import DEFAULT_SYSTEM_PROMPT, chat_ids, prompt_ids
from llmpack.runtime.tokenizer import Tokenizer


@dataclass(frozen=True)
class EngineOptions:
    backend: str = "auto"
    threads: int | None = None
    # None: the artifact's default (itself defaulting to Workers AI's); "" turns it off.
    system_prompt: str | None = None
    verify_checksums: bool = True


class Engine:
    def __init__(self, artifact: Artifact, backend, tokenizer: Tokenizer, system_prompt: str | None):
        self.artifact = artifact
        self.backend = backend
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt or None
        manifest = artifact.manifest
        self.context_limit = min(CONTEXT_LIMIT, backend.context_length)
        self.input_limit = min(INPUT_LIMIT, self.context_limit - 1)
        self.stop_ids = manifest.stop_token_ids
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: Path | str, options: EngineOptions = EngineOptions()) -> Engine:
        artifact = open_artifact(path, verify_checksums=options.verify_checksums)
        tokenizer = Tokenizer.from_file(artifact.tokenizer_path)
        backend = open_backend(artifact, options.backend, options.threads)
        system = options.system_prompt
        if system is None:
            stored = artifact.manifest.default_system_prompt
            system = DEFAULT_SYSTEM_PROMPT if stored is None else stored
        return cls(artifact, backend, tokenizer, system)

    @property
    def model_name(self) -> str:
        return self.artifact.manifest.name

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """The exact ids the model is fed for this request; refuses prompts over the input limit."""
        if request.messages is not None:
            ids = chat_ids(self.tokenizer, request.messages)
        else:
            ids = prompt_ids(self.tokenizer, request.prompt, request.raw, self.system_prompt)
        if len(ids) > self.input_limit:
            raise InputTooLong(
                f"prompt is {len(ids)} tokens, the limit is {self.input_limit}; "
                "shorten the prompt or the conversation history"
            )
        return ids

    def stream(self, request: GenerationRequest) -> TextStream:
        """The response as a text stream; iterate it to generate (one sequence at a time)."""
        ids = self.prompt_ids(request)
        tokens = TokenStream(self.backend, ids, request.max_tokens, request.sampling, self.stop_ids)
        return TextStream(_Exclusive(tokens, self._lock), self.tokenizer)

    def complete(self, request: GenerationRequest) -> Completion:
        return complete(self.stream(request))


class _Exclusive:
    """A TokenStream that holds the engine's lock while it runs: the backend has one KV cache."""

    def __init__(self, tokens: TokenStream, lock: threading.Lock):
        self._tokens, self._lock = tokens, lock

    def __iter__(self) -> Iterator[int]:
        with self._lock:
            yield from self._tokens

    def __getattr__(self, name):
        return getattr(self._tokens, name)
