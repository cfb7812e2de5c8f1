"""CLI edge of the runtime: `llm-serve infer | tokenize | bench` (and `run`, the HTTP server), no torch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from llmpack.cli.bench_cmd import bench
from llmpack.cli.common import defaults_of, setup_logging, translate_errors
from llmpack.runtime.artifact import BACKENDS
from llmpack.runtime.engine import MAX_PROPOSED_LIMIT, SPECULATION_MODES, EngineOptions
from llmpack.runtime.errors import InvalidRequest
from llmpack.runtime.serve.settings import DEFAULT_HOST, DEFAULT_PORT, ConnectionLimits, ServerSettings


def read_request(request: str | None, overrides: dict) -> dict:
    """REQUEST as JSON text, @file or - (stdin); convenience flags override its fields."""
    if request is None:
        body: object = {}
    else:
        if request == "-":
            text = sys.stdin.read()
        elif request.startswith("@"):
            try:
                text = Path(request[1:]).read_text(encoding="utf-8")
            except OSError as exc:
                raise InvalidRequest(f"cannot read request file {request[1:]}: {exc.strerror}") from exc
        else:
            text = request
        from llmpack.runtime.serve.protocol import decode_json

        body = decode_json(text, "REQUEST")  # the server's own strict decoding
    if not isinstance(body, dict):
        raise InvalidRequest("REQUEST must be a JSON object with 'prompt' or 'messages'")
    return {**body, **{k: v for k, v in overrides.items() if v is not None}}


# Each default is defined once, on the options dataclasses; the click options show and use those.
ENGINE, SERVER, CONNECTIONS = defaults_of(EngineOptions), defaults_of(ServerSettings), defaults_of(ConnectionLimits)
ENGINE_KEY = "llmpack.engine-options"
REQUEST_KEY = "llmpack.request-overrides"


def _remember(key: str):
    """A click callback that files an option's value under ctx.meta[key] instead of the signature,
    so every command decorated with the same option group reads them the same way."""
    def callback(ctx: click.Context, param: click.Parameter, value):
        ctx.meta.setdefault(key, {})[param.name] = value
        return value
    return callback


def engine_options(f):
    remember = dict(expose_value=False, callback=_remember(ENGINE_KEY))
    f = click.option("--threads", type=click.IntRange(min=1), default=None, help="Inference threads (default: all cores).", **remember)(f)
    f = click.option("--backend", type=click.Choice(BACKENDS), default=ENGINE.backend, show_default=True, **remember,
                     help="Inference backend; auto: TensorRT if the artifact has an engine this GPU can run, "
                          "else ONNX Runtime CUDA, else CPU.")(f)
    f = click.option("--system-prompt", default=None, help="System prompt for raw=false prompts ('' turns it off).", **remember)(f)
    f = click.option("--no-verify-checksums", is_flag=True, help="Skip hashing artifact files at load (sizes still checked).", **remember)(f)
    f = click.option("--huge-pages/--no-huge-pages", default=ENGINE.huge_pages, show_default=True, **remember,
                     help="CPU backends: move the loaded weights onto 2 MiB pages (fewer TLB misses per "
                          "decode step; ~1 s per GB at start-up).")(f)
    f = click.option("--speculate", type=click.Choice(SPECULATION_MODES), default=ENGINE.speculate, show_default=True,
                     **remember, help="ngram: prompt-lookup speculative decoding — tokens the text so far suggests "
                     "are checked several per step where that pays; the answers are the same (exact for greedy and "
                     "sampling). CPU backends, one sequence at a time; off: never.")(f)
    f = click.option("--speculate-max", type=click.IntRange(1, MAX_PROPOSED_LIMIT), default=ENGINE.speculate_max,
                     show_default=True, **remember, help="ngram: the most proposed tokens one step checks; how many it "
                     "does check follows the text's acceptance and the measured cost of a wider step.")(f)
    return f


def connection_options(f):
    """What one client may hold: the time its request may take to arrive, idle connections, their number."""
    seconds = click.FloatRange(min=0.1)
    f = click.option("--limit-concurrency", type=click.IntRange(min=1), default=None,
                     help="Most connections + requests at once; beyond it uvicorn answers a plain 503 "
                          "(default: no limit; the queue and the timeouts bound the work).")(f)
    f = click.option("--head-timeout", type=seconds, default=CONNECTIONS.head_timeout_s, show_default=True,
                     help="Seconds a client has to send its request line and headers (from connecting or "
                          "from the previous response); then the connection is closed.")(f)
    f = click.option("--keep-alive-timeout", type=seconds, default=CONNECTIONS.keep_alive_s, show_default=True,
                     help="Seconds an idle keep-alive connection stays open after a response.")(f)
    f = click.option("--body-timeout", type=seconds, default=SERVER.body_timeout_s, show_default=True,
                     help="Seconds the whole request body may take to arrive; then 408.")(f)
    return f


def request_options(f):
    remember = dict(expose_value=False, callback=_remember(REQUEST_KEY))
    f = click.option("--seed", type=int, default=None, **remember)(f)
    f = click.option("--temperature", type=float, default=None, **remember)(f)
    f = click.option("--max-tokens", type=int, default=None, **remember)(f)
    f = click.option("--stream/--no-stream", default=None, help="Print the event stream.", **remember)(f)
    f = click.option("--raw", is_flag=True, default=None, help="Send the prompt without the chat template.", **remember)(f)
    f = click.option("--prompt", default=None, help="Build the request from this prompt.", **remember)(f)
    return f


def cli_request(request: str | None, artifact: Path):
    """(REQUEST with the convenience flags applied, validated exactly as the server validates a body; the
    artifact's chat format, or None when the artifact cannot be read — loading the engine says why).

    The chat format checks the request too, before any model loads: a bad request fails at once, quietly.
    The engine then reuses that chat format and its tokenizer instead of loading them again.
    """
    from llmpack.runtime.artifact import Artifact
    from llmpack.runtime.chat_format import check_request, load_chat_format, load_tokenizer
    from llmpack.runtime.errors import ArtifactError
    from llmpack.runtime.manifest import read_manifest
    from llmpack.runtime.serve.protocol import parse_request

    overrides = click.get_current_context().meta.get(REQUEST_KEY, {})
    parsed = parse_request(read_request(request, overrides))
    try:  # only the manifest and the tokenizer: the engine checks every file when it loads
        folder = Path(artifact).expanduser().resolve()
        opened = Artifact(folder, read_manifest(folder))
        chat = load_chat_format(opened, load_tokenizer(opened))
    except ArtifactError:
        return parsed, None  # a damaged artifact: loading the engine names what is wrong with it
    return check_request(chat, parsed), chat


def load_engine(artifact: Path, max_batch: int = 1, chat_format=None):
    """The engine as the server runs it: the Workers AI spec's context and input limits, the chosen options."""
    from llmpack.runtime.engine import Engine
    from llmpack.runtime.serve.protocol import ENGINE_LIMITS

    return Engine.load(artifact, chosen_engine_options(max_batch, **ENGINE_LIMITS), chat_format)


def chosen_engine_options(max_batch: int, **more) -> EngineOptions:
    """EngineOptions from the engine option group given on the command line."""
    chosen = click.get_current_context().meta.get(ENGINE_KEY, {})
    given = {name: value for name, value in chosen.items() if name != "no_verify_checksums"}
    return EngineOptions(**given, verify_checksums=not chosen.get("no_verify_checksums", False),
                         max_batch=max_batch, **more)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Serve an llmpack artifact: Workers AI's llama-2-7b-chat-fp16 schema."""
    setup_logging(verbose)


def request_command(command):
    """`llm-serve COMMAND ARTIFACT [REQUEST]` with the request flags and the engine options."""
    for decorate in (translate_errors, engine_options, request_options, click.argument("request", required=False),
                     click.argument("artifact", type=click.Path(path_type=Path)), main.command()):
        command = decorate(command)
    return command


@request_command
def infer(artifact, request):
    """Answer one REQUEST (JSON, @file or -) and print the response exactly as the server sends it."""
    from llmpack.runtime.serve.protocol import SSE_DONE, completion_json, sse_event, sse_usage_event

    parsed, chat = cli_request(request, artifact)
    engine = load_engine(artifact, chat_format=chat)
    text_stream = engine.stream_request(parsed)
    out = sys.stdout.buffer
    if parsed.stream:
        for piece in text_stream:
            out.write(sse_event({"response": piece}))
            out.flush()
        out.write(sse_usage_event(text_stream.usage) + SSE_DONE)
    else:
        text = "".join(text_stream)
        out.write(json.dumps(completion_json(text, text_stream.usage), ensure_ascii=False).encode() + b"\n")
    out.flush()


@request_command
def tokenize(artifact, request):
    """Print the exact ids the model would be fed for REQUEST: {"tokens": [...], "count": N}."""
    parsed, chat = cli_request(request, artifact)
    ids = load_engine(artifact, chat_format=chat).request_ids(parsed)
    click.echo(json.dumps({"tokens": ids, "count": len(ids)}))


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True)
@click.option("--api-key", envvar="LLMPACK_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every route but /health and /ready "
                   "(prefer the env var LLMPACK_API_KEY: a flag shows in the process list).")
@click.option("--max-queue", type=click.IntRange(min=0), default=SERVER.max_queue, show_default=True,
              help="Requests that may wait while --max-batch generate; beyond that the server answers 429.")
@click.option("--max-body-bytes", type=click.IntRange(min=1024), default=SERVER.max_body_bytes, show_default=True,
              help="Larger request bodies get 413.")
@click.option("--stream-padding", is_flag=True, help="Add Workers AI's random 'p' padding field to stream events.")
@click.option("--shutdown-timeout", type=click.FloatRange(min=0), default=SERVER.shutdown_timeout_s, show_default=True,
              help="Seconds in-flight requests get to finish after SIGTERM/SIGINT before they are cancelled.")
@click.option("--max-batch", type=click.IntRange(1, 256), default=ENGINE.max_batch, show_default=True,
              help="Requests decoded together in one batched step (continuous batching).")
@click.option("--mixed-steps/--no-mixed-steps", default=ENGINE.mixed_steps, show_default=True, expose_value=False,
              callback=_remember(ENGINE_KEY),
              help="ort-fused artifacts: read a joining prompt inside the running decode step (one pass over the "
                   "weights); costs a second ONNX Runtime session, i.e. the weights held twice in memory.")
@click.option("--prefix-cache-mb", type=click.IntRange(min=0), default=ENGINE.prefix_cache_mb, show_default=True,
              expose_value=False, callback=_remember(ENGINE_KEY),
              help="Memory for KV copies of recent sequences: a prompt that begins like one of them (the template "
                   "and system prompt, a chat's earlier turns) skips computing that part. 0 turns it off.")
@click.option("--served-model-name", default=None,
              help="The model id /v1/models lists and requests may name (default: the artifact's name); "
                   "the Workers AI id @cf/meta/llama-2-7b-chat-fp16 is always accepted too.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="text: 'time LEVEL logger: message' lines; json: one object per line for log shippers.")
@connection_options
@engine_options
@translate_errors
def run(artifact, host, port, api_key, max_queue, max_body_bytes, stream_padding, shutdown_timeout, max_batch,
        served_model_name, log_format, body_timeout, keep_alive_timeout, head_timeout, limit_concurrency):
    """Serve ARTIFACT over HTTP: Workers AI and OpenAI-compatible routes, /health, /ready, /metrics."""
    import logging

    from llmpack.runtime.serve.server import create_app
    from llmpack.runtime.serve.uvicorn_runner import listen_socket, serve  # uvicorn; fastapi comes with server

    verbose = logging.getLogger().isEnabledFor(logging.DEBUG)
    setup_logging(verbose, log_format, timestamps=True)
    sock = listen_socket(host, port)  # before the model loads: a taken port fails at once
    engine = load_engine(artifact, max_batch)
    settings = ServerSettings(api_key=api_key or None, max_queue=max_queue, max_body_bytes=max_body_bytes,
                              stream_padding=stream_padding, shutdown_timeout_s=shutdown_timeout,
                              body_timeout_s=body_timeout, served_model_name=served_model_name)
    app = create_app(engine, settings)
    description = f"model {engine.model_name} (as {' or '.join(app.state.llm.models)})"
    limits = ConnectionLimits(keep_alive_timeout, head_timeout, limit_concurrency)
    serve(app, host, port, description, shutdown_timeout, verbose, limits, drain=app.state.llm.drain, sock=sock)
    logging.getLogger("llmpack.server").info("stopped")


from llmpack.cli.cluster_cmd import cluster  # last: it reuses this module's option groups

main.add_command(bench)
main.add_command(cluster)
