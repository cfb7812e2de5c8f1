"""CLI edge: `llm-serve bench ARTIFACT` — time to first token and decode speed of one artifact, as JSON.

Runs the artifact's backend directly (the decode loop's own prefill/decode calls, no HTTP, no
scheduler thread) on the shared benchmark workload (cli/bench_workload.py), so the numbers compare
with the peers that `make bench` runs on the same prompt ids.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import click

from llmpack.cli import bench_workload as workload
from llmpack.cli.common import translate_errors
from llmpack.runtime.backends.mlas_layout import linear_weight_bytes
from llmpack.runtime.engine import MAX_PROPOSED_LIMIT, SPECULATION_MODES, EngineOptions

# `llm-serve bench` times the backend's own steps by default, as the peers (llama-bench, genai) are timed; the
# engine's default (EngineOptions.speculate, ngram) needs the engine's loop, which --speculate ngram times.
BENCH_SPECULATE = "off"


def describe(manifest) -> str:
    precision = manifest.quant.method if manifest.quant else manifest.dtype
    return f"llmpack {manifest.graph_flavour} {precision}"


@click.command("bench")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--new-tokens", type=click.IntRange(min=2), default=128, show_default=True,
              help="Tokens generated per run, greedy, stop tokens ignored.")
@click.option("--runs", type=click.IntRange(min=1), default=5, show_default=True, help="Timed generations.")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True, help="Untimed generations first.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads [default: all cores].")
@click.option("--huge-pages/--no-huge-pages", default=True, show_default=True,
              help="Move the loaded weights onto 2 MiB pages (what serving does).")
@click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Time this text (a raw prompt, the artifact's tokenizer) instead of --prompt-tokens synthetic ids.")
@click.option("--speculate", type=click.Choice(SPECULATION_MODES), default=BENCH_SPECULATE, show_default=True,
              help="ngram: time the engine's own loop with prompt-lookup speculation (off: the backend's steps "
                   "directly, as the peers are timed).")
@click.option("--speculate-max", type=click.IntRange(1, MAX_PROPOSED_LIMIT), default=EngineOptions.speculate_max,
              show_default=True, help="ngram: the most proposed tokens one step checks.")
@click.option("--name", default=None, help="Label in the JSON line [default: llmpack FLAVOUR PRECISION].")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench-results.jsonl"), show_default=True,
              help="JSON-lines file the record is appended to.")
@translate_errors
def bench(artifact: Path, prompt_tokens: int, new_tokens: int, runs: int, warmup: int, threads: int | None,
          huge_pages: bool, prompt_file: Path | None, speculate: str, speculate_max: int, name: str | None,
          out: Path) -> None:
    """Measure TTFT, decode tokens/s (median and spread), peak RSS and size of ARTIFACT; print a JSON line."""
    from llmpack.runtime.artifact import open_artifact
    from llmpack.runtime.backends.ort_cpu import default_threads

    opened = open_artifact(artifact, verify_checksums=False)
    manifest = opened.manifest
    prompt = _prompt(opened, prompt_file, prompt_tokens)
    if len(prompt) + new_tokens > manifest.max_context:
        raise click.BadParameter(f"{len(prompt)} + {new_tokens} tokens exceed the artifact's context of "
                                 f"{manifest.max_context}", param_hint="--prompt-tokens/--prompt-file/--new-tokens")
    threads = threads or default_threads()
    timings, backend_name, extra = _timed(opened, prompt, new_tokens, runs, warmup, threads, huge_pages,
                                         EngineOptions(speculate=speculate, speculate_max=speculate_max))
    prompt_tokens = len(prompt)
    line = workload.record(
        name or describe(manifest), timings, prompt_tokens=prompt_tokens, new_tokens=new_tokens, threads=threads,
        artifact_bytes=sum(f.size for f in manifest.files), weight_bytes_per_token=linear_weight_bytes(manifest),
        packages=("llmpack", "onnxruntime", "numpy"), artifact=str(opened.path), backend=backend_name,
        graph_flavour=manifest.graph_flavour, huge_pages=huge_pages,
        quant=manifest.quant.method if manifest.quant else "none", speculate=speculate,
        speculate_max=speculate_max if speculate != "off" else None,
        prompt_file=str(prompt_file) if prompt_file else None, **extra)
    sys.stdout.write(workload.emit(line, str(out)) + "\n")


def _timed(opened, prompt: list[int], new_tokens: int, runs: int, warmup: int, threads: int, huge_pages: bool,
           speculation: EngineOptions) -> tuple[dict, str, dict]:
    """(timings, backend name, extra record fields): the backend's own steps, or with speculation the engine's loop."""
    from llmpack.runtime.artifact import open_backend
    from llmpack.runtime.engine import Engine

    if speculation.speculate == "off":
        backend = open_backend(opened, "cpu", threads=threads, max_batch=1, huge_pages=huge_pages)
        return workload.run_backend(backend, prompt, new_tokens, runs, warmup), backend.name, {}
    options = replace(speculation, backend="cpu", threads=threads, max_batch=1, prefix_cache_mb=0,
                      huge_pages=huge_pages, verify_checksums=False)
    engine = Engine.load(opened.path, options)
    try:
        timings = workload.run_engine(engine, prompt, new_tokens, runs, warmup)
    finally:
        engine.close()
    return timings, engine.backend.name, {"speculated": engine.scheduler.proposed,
                                          "speculated_accepted": engine.scheduler.accepted}


def _prompt(opened, prompt_file: Path | None, prompt_tokens: int) -> list[int]:
    """The synthetic workload the peers share, or a real text's ids in the artifact's own tokenizer."""
    if prompt_file is None:
        manifest = opened.manifest
        bos = 1 if manifest.bos_token_id is None else manifest.bos_token_id
        return workload.prompt_ids(prompt_tokens, manifest.config.vocab_size, bos)
    from llmpack.runtime.chat_format import load_tokenizer

    ids = load_tokenizer(opened).raw_prompt_ids(prompt_file.read_text(encoding="utf-8"))
    if len(ids) < 1:
        raise click.BadParameter(f"{prompt_file} holds no text", param_hint="--prompt-file")
    return ids


if __name__ == "__main__":  # `python -m llmpack.cli.bench_cmd`: what `make bench` runs, registered or not
    bench()
