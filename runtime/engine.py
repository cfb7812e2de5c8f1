"""Engine core: the engine — prompt ids in, token or text stream out; what the CLI and the server share.

It owns the artifact, tokenizer, backend and batch scheduler. `request_ids` turns a validated request
into prompt ids (template + the input limit) once; `submit` / `stream` hand ids to the scheduler,
which decodes all requests in flight together. The engine knows no wire format: the limits it
enforces come in through EngineOptions (the serve wing fills them from the Workers AI spec).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from llmpack.runtime.artifact import Artifact, open_artifact, open_backend
from llmpack.runtime.backends.interface import Backend
from llmpack.runtime.batch_scheduler import BatchScheduler
from llmpack.runtime.chat_format import ChatFormat, load_chat_format, load_tokenizer
from llmpack.runtime.generate import Completion, TextStream, TokenSink, TokenStream, complete
from llmpack.runtime.manifest import DEFAULT_PREFILL_CHUNK, LLAMA2_CHAT
from llmpack.runtime.prefix_cache import DEFAULT_BUDGET_MB, PrefixCache
from llmpack.runtime.request import GenerationRequest, check_prompt_length
from llmpack.runtime.sampling import SamplingParams
from llmpack.runtime.speculation import DEFAULT_MAX_PROPOSED
from llmpack.runtime.template import DEFAULT_SYSTEM_PROMPT
from llmpack.runtime.tokenizer import TextTokenizer

log = logging.getLogger("llmpack.runtime")

SPECULATION_MODES = ("off", "ngram")
MAX_PROPOSED_LIMIT = 16  # --speculate-max: a 9-fed check already costs 1.5-4.4 decode steps on every backend measured


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
    # CPU backends: the loaded weights moved onto 2 MiB pages (runtime/backends/huge_pages.py)
    huge_pages: bool = True
    # Tokens a request may hold (prompt + answer) and its prompt alone; None: what the backend holds
    # (and one less for the prompt). The serve wing passes the Workers AI spec's 3072 / 2500.
    context_limit: int | None = None
    input_limit: int | None = None
    # "ngram": prompt-lookup speculative decoding (runtime/speculation.py), exact; at batch 1, on both CPU graphs.
    # On by default: in `make bench-speculate` (bench/results/speculation-2026-12-05-prior.md) it gained up to 1.47x
    # served where text repeats (stories260k) and stayed within 3 % and the run's own off-vs-off noise elsewhere
    # (its cost model backs off where checks do not pay: int4 on 2 cores, text that never repeats).
    speculate: str = "ngram"
    # ngram: the most proposed tokens one step checks; the cost model chooses how many, up to this
    speculate_max: int = DEFAULT_MAX_PROPOSED


class Engine:
    def __init__(self, artifact: Artifact, backend: Backend, tokenizer: TextTokenizer, system_prompt: str | None,
                 options: EngineOptions = EngineOptions(), chat_format: ChatFormat | None = None):
        self.artifact = artifact
        self.backend = backend
        self.tokenizer = tokenizer
        # the manifest's: Llama-2-chat, the checkpoint's Jinja template, or none (raw prompts only)
        self.chat_format = chat_format or load_chat_format(artifact, tokenizer)
        self.system_prompt = system_prompt or None
        self.stop_ids = artifact.manifest.stop_token_ids
        prefix_cache_mb = options.prefix_cache_mb
        cache = PrefixCache(prefix_cache_mb << 20) if prefix_cache_mb > 0 else None
        if options.speculate not in SPECULATION_MODES:
            raise ValueError(f"speculate={options.speculate!r}; choose one of {', '.join(SPECULATION_MODES)}")
        if not 1 <= options.speculate_max <= MAX_PROPOSED_LIMIT:
            raise ValueError(f"speculate_max={options.speculate_max}; choose 1 to {MAX_PROPOSED_LIMIT}")
        self.scheduler = BatchScheduler(backend, options.prefill_chunk, cache, options.context_limit,
                                        max_proposed=options.speculate_max if options.speculate == "ngram" else 0)
        self.context_limit = self.scheduler.context_limit  # at most what the backend holds
        self.input_limit = min(options.input_limit or self.context_limit, self.context_limit - 1)
        if self.prefix_cache is not None:  # in tokens, what the megabytes mean for this model
            log.info("prefix cache: %d MiB, room for %d tokens of this model's KV cache", prefix_cache_mb,
                     (prefix_cache_mb << 20) // self.scheduler.copies.kv_bytes(1))
        elif cache is not None:
            log.info("prefix cache off: the %s backend cannot copy its KV cache", backend.name)

    @classmethod
    def load(cls, path: Path | str, options: EngineOptions = EngineOptions(),
             chat_format: ChatFormat | None = None) -> Engine:
        """chat_format: the artifact's, when the caller already loaded it (with its tokenizer) to check a
        request before the model loads; the files are checked here all the same."""
        artifact = open_artifact(path, verify_checksums=options.verify_checksums)
        tokenizer = load_tokenizer(artifact) if chat_format is None else chat_format.tokenizer
        backend = open_backend(artifact, options.backend, options.threads, options.max_batch,
                               mixed_steps=options.mixed_steps, huge_pages=options.huge_pages)
        system = options.system_prompt
        if system is None:
            # Workers AI's default system prompt is its Llama-2-chat model's; another model's own template
            # brings its default (Qwen2's "You are a helpful assistant.", Llama-3.1's date block) when none is set
            stored = artifact.manifest.default_system_prompt
            meta_chat = artifact.manifest.chat_template == LLAMA2_CHAT
            system = (DEFAULT_SYSTEM_PROMPT if meta_chat else None) if stored is None else stored
        return cls(artifact, backend, tokenizer, system, options, chat_format)

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

    def request_ids(self, request: GenerationRequest) -> list[int]:
        """The exact ids the model is fed for this request; refuses prompts over the input limit.

        Computed once per request, where it is read; the ids then travel with it to `submit`.
        """
        # The wire parser checked the request's shape; the rules of turns (roles, turn tags, special-token
        # text) belong to the model's chat format, so they are checked here, once.
        chat = self.chat_format
        if request.messages is not None:
            ids = chat.chat_ids(chat.check(request.messages))
        else:
            ids = chat.prompt_ids(request.prompt, request.raw, self.system_prompt)
        check_prompt_length(len(ids), self.input_limit)
        return ids

    def submit(self, sink: TokenSink, max_tokens: int, sampling: SamplingParams, stop_ids=None) -> None:
        """Queue the sequence of `sink.prompt_ids`; the batch thread hands each new token to `sink`."""
        self.scheduler.submit(sink, max_tokens, sampling, self.stop_ids if stop_ids is None else stop_ids)

    def generate_ids(self, prompt_ids: list[int], max_tokens: int, sampling: SamplingParams,
                     stop_ids=None) -> TokenStream:
        """A blocking iterator of the generated ids; it runs batched with every other sequence in flight."""
        tokens = TokenStream(prompt_ids)
        self.submit(tokens, max_tokens, sampling, stop_ids)
        return tokens

    def stream(self, prompt_ids: list[int], max_tokens: int, sampling: SamplingParams) -> TextStream:
        """The answer to these prompt ids as a text stream (UTF-8 safe pieces)."""
        return TextStream(self.generate_ids(prompt_ids, max_tokens, sampling), self.tokenizer)

    def stream_request(self, request: GenerationRequest) -> TextStream:
        return self.stream(self.request_ids(request), request.max_tokens, request.sampling)

    def complete(self, request: GenerationRequest) -> Completion:
        return complete(self.stream_request(request))

    def close(self) -> None:
        self.scheduler.close()
