"""CLI edge of the export stage: `llm-export build | verify | inspect`; torch comes in only with the build's imports."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from llmpack.cli.common import defaults_of, setup_logging, translate_errors
from llmpack.cli.graph_options import graph_options
from llmpack.cli.inspect_view import build_summary
from llmpack.export.options import BuildOptions, EngineBuildOptions
from llmpack.runtime.artifact import BACKENDS

BUILD, ENGINE = defaults_of(BuildOptions), defaults_of(EngineBuildOptions)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Turn a Hugging Face Llama checkpoint into a verified ONNX artifact."""
    setup_logging(verbose)


@main.command()
@click.option("--model", required=True, help="Hugging Face Llama checkpoint folder; `stories260k` for the shipped trained tiny "
                   "Llama (readable stories), or `demo` for random weights.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Artifact folder to write, e.g. artifacts/NAME.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default=BUILD.dtype, show_default=True)
@click.option("--max-context", type=click.IntRange(min=2), default=BUILD.max_context, show_default=True,
              help="Context length; capped at the model's max_position_embeddings.")
@click.option("--system-prompt", default=None, help="Default system prompt stored in the artifact (raw=false prompts).")
@click.option("--force", is_flag=True, help="Rebuild even when an identical artifact exists.")
@click.option("--engine", type=click.Choice(["none", "trt"]), default="none", show_default=True,
              help="Also build a TensorRT engine (model.plan) for this machine's GPU; needs llmpack[gpu].")
@click.option("--max-batch", type=click.IntRange(min=1), default=ENGINE.max_batch, show_default=True,
              help="With --engine trt: the most sequences one decode step runs.")
@click.option("--workspace-gb", type=click.FloatRange(min=0.25), default=ENGINE.workspace_gb, show_default=True,
              help="With --engine trt: TensorRT's builder workspace limit.")
@graph_options
@translate_errors
def build(model: str, out: Path, dtype: str, max_context: int, system_prompt: str | None, force: bool,
          engine: str, max_batch: int, workspace_gb: float, graph_options: dict) -> None:
    """Build an artifact (ONNX decoder with KV cache + tokenizer + manifest.json [+ TensorRT engine])."""
    from llmpack.export.build import BuildOptions
    from llmpack.export.build import build as run_build

    options = BuildOptions(model=model, out=out, dtype=dtype, max_context=max_context, force=force,
                           progress=sys.stderr.isatty(), system_prompt=system_prompt, **graph_options)
    built_engine = None
    if engine == "trt":
        from llmpack.export.trt_build import EngineBuildOptions, build_with_engine

        result, built_engine = build_with_engine(options, EngineBuildOptions(max_batch, workspace_gb, force))
    else:
        result = run_build(options)
    state = "up to date (reused; --force rebuilds)" if result.reused else "built"
    click.echo(f"{result.path}: {state}; {build_summary(result.manifest)}")
    if built_engine is not None:
        click.echo(built_engine.summary())


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--steps", type=click.IntRange(min=1), default=32, show_default=True, help="Greedy decode steps.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="Backend whose answers are checked (cuda/tensorrt: on a GPU machine).")
@click.option("--source", type=click.Path(path_type=Path), default=None,
              help="The source checkpoint's folder, when it is no longer where the build read it (its weight "
                   "files must be the ones the artifact was built from: their SHA-256 are checked).")
@translate_errors
def verify(artifact: Path, steps: int, backend: str, source: Path | None) -> None:
    """Check the artifact against its source model in PyTorch; exit non-zero on a parity failure."""
    from llmpack.export.verify import verify as run_verify
    from llmpack.runtime.errors import ParityError

    report = run_verify(artifact, steps=steps, backend=backend, source=source)
    click.echo(report.table())
    if not report.ok:
        raise ParityError(f"{artifact} does not match its source model; rebuild it, and report a bug if it persists")


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the raw manifest.json.")
@translate_errors
def inspect(artifact: Path, as_json: bool) -> None:
    """Print an artifact's manifest in a human-readable form."""
    from llmpack.cli.inspect_view import describe
    from llmpack.runtime.manifest import read_manifest

    manifest = read_manifest(artifact)
    click.echo(manifest.to_json() if as_json else describe(manifest), nl=not as_json)
