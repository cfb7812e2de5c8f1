"""Generation stage 4: the engine — request in, text stream out; what the CLI and the server share.

It owns the artifact, tokenizer, backend and batch scheduler, turns a validated request into prompt
ids (template + limits) and hands them to the scheduler, which decodes all requests in flight together.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from llmpack.runtime.artifact import Artifact, open_artifact, open_backend
from llmpack.runtime.batch_scheduler import DEFAULT_PREFILL_CHUNK, BatchScheduler
from llmpack.runtime.errors import InputTooLong
from llmpack.runtime.generate import Completion, TextStream, TokenStream, complete
from llmpack.runtime.prefix_cache import DEFAULT_BUDGET_MB, PrefixCache
from llmpack.runtime.protocol import CONTEXT_LIMIT, INPUT_LIMIT, GenerationRequest
from llmpack.runtime.sampling import SamplingParams
from llmpack.runtime.template import DEFAULT_SYSTEM_PROMPT, chat_ids, prompt_ids
from llmpack.runtime.tokenizer import Tokenizer

log = logging.getLogger("llmpack.runtime")


@dataclass(frozen=True)
class EngineOptions:
    backend: str = "auto"
    threads: int | None = None
    # None: the artifact's default (itself defaulting to Workers AI's); "" turns it off.
    system_prompt: str | None = None
    verify_checksums: bool = True
    max_batch: int = 8  # sequences decoded together in one step
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    # ort-fused artifacts: a joining prompt shares the decode step's pass over the weights (a second
    # ONNX Runtime session: the weights are held twice); False saves that memory
    mixed_steps: bool = True
    # KV copies of recent sequences, so a prompt that begins like one of them (the template and system
    # prompt, a chat's earlier turns) skips that part; 0 turns it off
    prefix_cache_mb: int = DEFAULT_BUDGET_MB
    # CPU backends: the loaded weights moved onto 2 MiB pages (runtime/huge_pages.py)
    huge_pages: bool = True


class Engine:
    def __init__(self, artifact: Artifact, backend, tokenizer: Tokenizer, system_prompt: str | None,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, prefix_cache_mb: int = 0):
        self.artifact = artifact
        self.backend = backend
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt or None
        manifest = artifact.manifest
        self.context_limit = min(CONTEXT_LIMIT, backend.context_length)
        self.input_limit = min(INPUT_LIMIT, self.context_limit - 1)
        self.stop_ids = manifest.stop_token_ids
        cache = PrefixCache(prefix_cache_mb << 20) if prefix_cache_mb > 0 else None
        self.scheduler = BatchScheduler(backend, prefill_chunk, cache)
        if self.prefix_cache is not None:  # in tokens, what the megabytes mean for this model
            log.info("prefix cache: %d MiB, room for %d tokens of this model's KV cache", prefix_cache_mb,
                     (prefix_cache_mb << 20) // backend.kv_bytes(1))
        elif cache is not None:
            log.info("prefix cache off: the %s backend cannot copy its KV cache", backend.name)

    @classmethod
    def load(cls, path: Path | str, options: EngineOptions = EngineOptions()) -> Engine:
        artifact = open_artifact(path, verify_checksums=options.verify_checksums)
        tokenizer = Tokenizer.from_file(artifact.tokenizer_path)
        backend = open_backend(artifact, options.backend, options.threads, options.max_batch,
                               mixed_steps=options.mixed_steps, huge_pages=options.huge_pages)
        system = options.system_prompt
        if system is None:
            stored = artifact.manifest.default_system_prompt
            system = DEFAULT_SYSTEM_PROMPT if stored is None else stored
        return cls(artifact, backend, tokenizer, system, options.prefill_chunk, options.prefix_cache_mb)

    @property
    def max_batch(self) -> int:
        """How many requests the engine decodes together."""
        return self.backend.max_batch

    @property
    def prefix_cache(self) -> PrefixCache | None:
        """The kept sequences' KV copies, or None (turned off, or a backend that cannot copy its cache)."""
        return self.scheduler.prefix_cache

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

    def generate_ids(self, prompt_ids: list[int], max_tokens: int, sampling: SamplingParams,
                     stop_ids=None) -> TokenStream:
        """Queue a sequence for the batch scheduler; iterate the result for its token ids."""
        stops = self.stop_ids if stop_ids is None else stop_ids
        return self.scheduler.submit(prompt_ids, max_tokens, sampling, stops)

    def stream(self, request: GenerationRequest) -> TextStream:
        """The response as a text stream; it runs batched with every other request in flight."""
        ids = self.prompt_ids(request)
        return TextStream(self.generate_ids(ids, request.max_tokens, request.sampling), self.tokenizer)

    def complete(self, request: GenerationRequest) -> Completion:
        return complete(self.stream(request))

    def close(self) -> None:
        self.scheduler.close()
