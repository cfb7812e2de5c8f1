"""Export stage 3: `llm-export build` — checkpoint → artifact folder, atomically and idempotently.

The artifact is written into a hidden staging folder beside the target and renamed into place only
when complete, so an interrupted build never leaves a folder that looks like an artifact. The same
inputs (weight checksums, options, llmpack version) reuse the existing artifact.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import fcntl
import glob
import hashlib
import json
import logging
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from llmpack.export.checkpoint import Checkpoint, open_checkpoint
from llmpack.export.demo import demo_cache_dir, write_demo_checkpoint
from llmpack.export.fused_graph import write_fused_graph
from llmpack.export.graph import OPSET, write_decoder_graph
from llmpack.export.mixed_graph import write_mixed_graph
from llmpack.export.options import DTYPES, BuildOptions, resolve_block_size, resolve_graph
from llmpack.export.progress import digest_files
from llmpack.export.quantize import ACCURACY_LEVELS, AUTO_BLOCK, BLOCK_SIZES, LARGE_MODEL_LINEAR_WEIGHTS, QUANT_BITS
from llmpack.runtime import __version__
from llmpack.runtime import manifest as names
from llmpack.runtime.backends import fused_interface as fused
from llmpack.runtime.errors import ArtifactError, BuildError
from llmpack.runtime.manifest import (
    BuildManifest,
    FileDigest,
    QuantInfo,
    SourceInfo,
    check_artifact_files,
    read_manifest,
)

log = logging.getLogger("llmpack.export")

@dataclass(frozen=True)
class BuildResult:
    path: Path
    manifest: BuildManifest
    reused: bool


# stories260K (llama2.c's, MIT): a real trained 260K-parameter Llama shipped in the package (1 MB), so a fresh
# install builds a model that answers readable English; export/models/stories260k/README.md has its provenance.
SHIPPED_MODELS = {"stories260k": "models/stories260k"}


def resolve_source(model: str) -> Path:
    """`demo` (random weights, written on first use), a shipped model's name, or a checkpoint folder."""
    if model == "demo":
        return write_demo_checkpoint(demo_cache_dir())
    if model in SHIPPED_MODELS and not Path(model).exists():  # a folder of that name in the cwd wins
        return Path(str(resources.files("llmpack.export").joinpath(SHIPPED_MODELS[model])))
    return Path(model).expanduser().resolve()


def tool_versions() -> dict[str, str]:
    import onnx
    import torch

    return {"onnx": onnx.__version__, "torch": torch.__version__, "python": ".".join(map(str, sys.version_info[:3]))}


def build_key(source_files: tuple[FileDigest, ...], options: BuildOptions, max_context: int) -> str:
    """Everything that determines the artifact's bytes, hashed: a match means nothing to rebuild."""
    material = {
        "llmpack": __version__,
        "weights": [(d.path, d.sha256) for d in source_files],
        "dtype": options.dtype,
        "max_context": max_context,
        "opset": OPSET,
        "system_prompt": options.system_prompt,
    }
    if options.graph != fused.STANDARD or options.quant != "none":  # old artifacts keep their keys
        material |= {"graph": options.graph, "quant": dataclasses.asdict(options.quant_spec)}
    if options.graph == fused.FLAVOUR:  # fused artifacts gained mixed.onnx: older ones are rebuilt
        material["mixed_step_graph"] = fused.MIXED_MODEL_FILE
    # Both flavours gained the speculation check's num_logits input (the standard one later): rebuilt too
    material["logit_rows_input"] = fused.NUM_LOGITS
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def _existing_manifest(out: Path) -> BuildManifest | None:
    """The manifest of what is at `out` now; refuses to touch a folder that is not an artifact."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise BuildError(f"output path {out} exists and is not a folder; choose another --out")
    if not (out / names.MANIFEST_FILE).is_file():
        if any(out.iterdir()):
            raise BuildError(
                f"output path {out} exists and is not an llmpack artifact (no {names.MANIFEST_FILE}); "
                "choose another --out or remove the folder"
            )
        return None
    try:
        return read_manifest(out)
    except ArtifactError:
        return None  # an artifact from another llmpack version: ours to replace


def _intact(out: Path, manifest: BuildManifest) -> bool:
    """Whether the artifact's files still match its manifest. A damaged one is rebuilt, not reused:
    the runtime refuses it with "rebuild it", and a rebuild that answered "up to date" would loop."""
    try:
        check_artifact_files(out, manifest, verify_checksums=True)
    except ArtifactError as exc:
        log.warning("%s; rebuilding it", exc.message)
        return False
    return True


@contextmanager
def build_lock(out: Path):
    """One build per output path at a time; a second one fails fast instead of corrupting the first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out.parent / f".{out.name}.lock"
    with open(lock_path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise BuildError(f"another llm-export build is writing {out}; wait for it to finish") from exc
        yield


def _check_disk(checkpoint: Checkpoint, folder: Path, options: BuildOptions) -> None:
    config, width, quant = checkpoint.config, 2 if options.dtype == "fp16" else 4, options.quant_spec
    if quant.enabled:  # the Linears quantized, the embedding table kept in the activation dtype
        size = config.linear_parameters * quant.file_bits_per_weight / 8 + config.vocab_size * config.hidden_size * width
    else:
        size = config.parameters * width
    needed = size * 1.05
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise BuildError(
            f"not enough disk space in {folder}: the artifact needs about {needed / 2**30:.1f} GiB, "
            f"{free / 2**30:.1f} GiB are free; free space or choose another --out"
        )


def _write_artifact(checkpoint: Checkpoint, source: SourceInfo, staging: Path, options: BuildOptions,
                    max_context: int, key: str) -> BuildManifest:
    quant = options.quant_spec
    graph_files = (names.MODEL_FILE, names.WEIGHTS_FILE)
    if options.graph == fused.FLAVOUR:
        inputs, outputs = write_fused_graph(checkpoint, staging, max_context, quant, options.progress)
        write_mixed_graph(staging)
        graph_files += (fused.MIXED_MODEL_FILE,)
    else:
        inputs, outputs = write_decoder_graph(checkpoint, staging, options.dtype, options.progress, quant)
    files = digest_files(staging, (*graph_files, *_write_tokenizer(checkpoint, staging)), "checksumming the artifact",
                         options.progress)
    choice = checkpoint.tokenizer
    manifest = BuildManifest(
        name=options.out.name,
        config=checkpoint.config,
        dtype=options.dtype,
        max_context=max_context,
        opset=OPSET,
        bos_token_id=checkpoint.bos_token_id,
        stop_token_ids=checkpoint.stop_token_ids,
        inputs=inputs,
        outputs=outputs,
        source=source,
        files=files,
        build_key=key,
        llmpack_version=__version__,
        tool_versions=tool_versions(),
        built_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        default_system_prompt=options.system_prompt,
        graph_flavour=options.graph,
        quant=QuantInfo(quant.name, quant.bits, quant.block_size, quant.accuracy_level, quant.symmetric)
        if quant.enabled else None,
        tokenizer=choice.tokenizer,
        chat_template=choice.chat_template,
        special_tokens=choice.special_tokens,
    )
    (staging / names.MANIFEST_FILE).write_text(manifest.to_json(), encoding="utf-8")
    return manifest


def _write_tokenizer(checkpoint: Checkpoint, staging: Path) -> tuple[str, ...]:
    """The tokenizer file (and the chat template, when the model brings its own) into the artifact."""
    choice = checkpoint.tokenizer
    written = (names.TOKENIZER_FILES[choice.tokenizer],)
    shutil.copyfile(checkpoint.path / choice.source_file, staging / written[0])
    if choice.template_text is not None:
        (staging / names.CHAT_TEMPLATE_FILE).write_text(choice.template_text, encoding="utf-8")
        written += (names.CHAT_TEMPLATE_FILE,)
    return written


def context_for(options: BuildOptions, checkpoint: Checkpoint) -> int:
    """--max-context, capped where the model stops being exact (each cap logged with its reason)."""
    config, context = checkpoint.config, options.max_context
    # max_position_embeddings also keeps `dynamic` RoPE exact: it recomputes its frequencies only past it
    caps = [(config.max_position_embeddings, "its max_position_embeddings"),
            # full attention equals the model's sliding-window attention only while the context fits the window
            (config.sliding_window, "its sliding_window (llmpack attends to the whole context)")]
    for limit, reason in caps:
        if limit is not None and limit < context:
            log.warning("context capped at %d for %s: %s", limit, checkpoint.path.name, reason)
            context = limit
    return context


def _swap_into_place(staging: Path, out: Path) -> None:
    """Replace out with staging; at every instant `out` is either the old or the new artifact, or absent."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(old / "artifact")
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale_staging(out: Path) -> None:
    """What a killed build of `out` left (called under its lock): only its own prefixes, never another path's."""
    for prefix in (f".{out.name}.build-", f".{out.name}.old-"):
        for stale in out.parent.glob(glob.escape(prefix) + "*"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)


def _check_graph_options(options: BuildOptions) -> None:
    if options.graph not in fused.FLAVOURS:
        raise BuildError(f"--graph {options.graph} is not supported; choose one of {', '.join(fused.FLAVOURS)}")
    if options.quant not in QUANT_BITS:
        raise BuildError(f"--quant {options.quant} is not supported; choose one of {', '.join(QUANT_BITS)}")
    if options.block_size not in (AUTO_BLOCK, *BLOCK_SIZES) or options.accuracy_level not in ACCURACY_LEVELS:
        raise BuildError(f"--block-size must be {AUTO_BLOCK} or one of {BLOCK_SIZES} and --accuracy-level one of "
                         f"{ACCURACY_LEVELS}")
    if options.dtype != "fp32" and (options.quant != "none" or options.graph != fused.STANDARD):
        raise BuildError("--quant and --graph ort-fused build fp32 activations (ONNX Runtime on the CPU); "
                         "use --dtype fp32")


def _resolved_block_size(options: BuildOptions, checkpoint: Checkpoint) -> BuildOptions:
    resolved = resolve_block_size(options, checkpoint.config.linear_parameters)
    if options.block_size == AUTO_BLOCK and options.quant != "none":
        log.info("--block-size auto: block %d for %.2f B Linear weights (128 from %.0f B on, else 32)",
                 resolved.block_size, checkpoint.config.linear_parameters / 1e9, LARGE_MODEL_LINEAR_WEIGHTS / 1e9)
    return resolved


def build(options: BuildOptions) -> BuildResult:
    options = resolve_graph(options)
    if options.dtype not in DTYPES:
        raise BuildError(f"--dtype {options.dtype} is not supported; choose one of {', '.join(DTYPES)}")
    _check_graph_options(options)
    if options.max_context < 2:
        raise BuildError(f"--max-context must be at least 2, got {options.max_context}")
    out = Path(options.out).expanduser().resolve()
    checkpoint = open_checkpoint(resolve_source(options.model))
    options = _resolved_block_size(options, checkpoint)
    max_context = context_for(options, checkpoint)
    with build_lock(out):
        existing = _existing_manifest(out)
        log.info("hashing the weights of %s (the build is skipped when nothing changed)", checkpoint.path)
        source = SourceInfo(path=str(checkpoint.path), files=checkpoint.digests(options.progress))
        key = build_key(source.files, options, max_context)
        if existing is not None and existing.build_key == key and not options.force and _intact(out, existing):
            log.info("artifact %s is up to date (same weights and options); reusing it, --force rebuilds", out)
            return BuildResult(out, existing, reused=True)
        _remove_stale_staging(out)
        _check_disk(checkpoint, out.parent, options)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
        staging.chmod(0o755)  # mkdtemp's 0700 would make the deployed artifact private to the builder
        try:
            manifest = _write_artifact(checkpoint, source, staging, options, max_context, key)
            _swap_into_place(staging, out)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise BuildError(f"disk full while writing the artifact in {out.parent}; free space and rerun") from exc
            raise BuildError(f"could not write the artifact to {out}: {exc}") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log.info("built %s (%s, context %d) from %s", out, options.dtype, max_context, checkpoint.path)
    return BuildResult(out, manifest, reused=False)
